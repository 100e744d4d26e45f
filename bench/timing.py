"""Timing shared by the benchmarks (it lives in the package, for `mpskernels bench` too):
ours and the peer's, sampled in alternating blocks in one run."""
from mpskernels.bench import paired_medians, paired_samples  # noqa: F401

"""Benchmarks run with: pip install '.[bench]' && pytest bench/ (see README.md)."""
import pytest

from mpskernels.bench import cpu_ticks, steal_since

_rows = []


@pytest.fixture
def report():
    """Collect (case, threads, ours_us, peer_us, ratio, extra) rows for the summary, each with
    the share of the CPUs the hypervisor took while its test ran (a figure taken while the
    host took much is not one of our code alone)."""
    start = cpu_ticks()

    def add(row):
        steal = steal_since(start)
        _rows.append(row if steal is None else (*row[:5], f"{row[5]}; host steal {100 * steal:.0f}%"))
    return add


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    terminalreporter.section("ours vs peers (ratio = ours / peer, same run; each file's docstring says how)")
    for case, threads, ours, peer, ratio, extra in _rows:
        terminalreporter.write_line(f"{case:42s} threads={threads} ours={ours:9.1f}us "
                                    f"peer={peer:9.1f}us ratio={ratio:5.2f} {extra}")

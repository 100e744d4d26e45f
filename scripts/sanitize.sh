#!/usr/bin/env bash
# Build the extension under a sanitizer in a scratch copy of this checkout and run tests there.
#
#   scripts/sanitize.sh [asan|tsan] [pytest arguments...]
#   scripts/sanitize.sh [asan|tsan] scripts/NAME.py [arguments...]   (a script instead of pytest,
#       e.g. scripts/fuzz_long.py --calls 20000: the long fuzz under the sanitizer)
#
# asan (default): AddressSanitizer + UndefinedBehaviorSanitizer over our C and the Cython
#   binding, the whole test suite. Any report is fatal (-fno-sanitize-recover, halt_on_error),
#   so pytest exits non-zero. Leaks: only allocations made by our extension count (see
#   scripts/lsan.supp for why Python's and NumPy's are suppressed).
# tsan: ThreadSanitizer over the thread-pool, queue and command-buffer tests (see
#   docs/reliability.md for what it covers in a CPython process).
#
# The uninstrumented python binary loads the runtime through LD_PRELOAD, which is why the
# runtime must come first. Uses the python on PATH (CI runs it inside its venv).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
mode="${1:-asan}"
[ $# -gt 0 ] && shift

# SANITIZE_DIR=path keeps the build there and reuses it (to run test files one by one).
if [ -n "${SANITIZE_DIR:-}" ]; then
    work="$SANITIZE_DIR/$mode"
    mkdir -p "$work"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi
if ! compgen -G "$work/mpskernels/_native*.so" >/dev/null; then
    cp -r "$here/setup.py" "$here/pyproject.toml" "$here/src" "$here/mpskernels" "$here/tests" \
          "$here/scripts" "$work/"
    rm -f "$work"/mpskernels/*.so "$work/mpskernels/_native.c"
    fresh=1
fi
cd "$work"

case "$mode" in
asan)
    flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
    # libstdc++ first too: a C++ library loaded later (onnxruntime) that throws needs the real
    # __cxa_throw that ASan's interceptor looks up at start.
    runtime="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
    tests=("$@")
    ;;
tsan)
    flags="-fsanitize=thread -fno-omit-frame-pointer -g"
    runtime="$(gcc -print-file-name=libtsan.so)"
    [ $# -gt 0 ] || set -- tests/test_thread_pool.py tests/test_concurrency.py tests/test_command_buffer.py tests/test_determinism.py
    tests=("$@")
    ;;
*)
    echo "usage: $0 [asan|tsan] [pytest args]" >&2
    exit 2
    ;;
esac

if [ -n "${fresh:-}" ]; then
    MPSKERNELS_CFLAGS="$flags" LDFLAGS="${flags%% *}" python setup.py -q build_ext --inplace \
        >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
fi

# The interpreter itself, not a wrapper script (pyenv shims are bash: keep the preload off them).
py="$(python -c 'import sys; print(sys.executable)')"
export PYTHONPATH="$work" MPSKERNELS_SANITIZER="$mode"
# PYTHONMALLOC=malloc: Python objects come from malloc, so the leak checker can see that
# blocks our objects point to are still reachable at exit (pymalloc's arenas are invisible).
export PYTHONMALLOC=malloc
# A request beyond 8 GiB fails (NULL: our C's MK_ENOMEM, NumPy's MemoryError) and a resident set
# beyond 12 GiB ends the run with a report, before the kernel's OOM killer picks any process.
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:exitcode=86:detect_leaks=1:malloc_context_size=3:strict_init_order=1:detect_stack_use_after_return=0:allocator_may_return_null=1:max_allocation_size_mb=8192:hard_rss_limit_mb=12288"
export LSAN_OPTIONS="suppressions=$work/scripts/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87"
export TSAN_OPTIONS="halt_on_error=1:exitcode=88:second_deadlock_stack=1:suppressions=$work/scripts/tsan.supp:report_signal_unsafe=0"
# Reports go to files: pytest captures fd 2, and a halted process never shows what it captured.
# Subprocesses the tests start (the MAX_ISA test) inherit all this and report there too.
rm -rf "$work/reports"
mkdir "$work/reports"
for tool in ASAN UBSAN TSAN; do
    declare -x "${tool}_OPTIONS=$(eval echo "\$${tool}_OPTIONS"):log_path=$work/reports/${tool,,}"
done
status=0
if [[ "${1:-}" == scripts/*.py ]]; then
    LD_PRELOAD="$runtime" "$py" "$@" || status=$?
else
    LD_PRELOAD="$runtime" "$py" -m pytest -q -p no:cacheprovider "${tests[@]}" || status=$?
fi
if compgen -G "$work/reports/*" >/dev/null; then
    echo "=== sanitizer reports ($mode) ==="
    cat "$work"/reports/*
    [ "$status" -ne 0 ] || status=1
fi
exit "$status"

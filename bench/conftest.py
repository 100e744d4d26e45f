"""Benchmarks run with: pip install '.[bench]' && pytest bench/ (see README.md)."""
import pytest

_rows = []


@pytest.fixture
def report():
    """Collect (case, threads, ours_us, peer_us, ratio, extra) rows for the summary."""
    return _rows.append


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    terminalreporter.section("ours vs peers (ratio = ours / peer, same run; each file's docstring says how)")
    for case, threads, ours, peer, ratio, extra in _rows:
        terminalreporter.write_line(f"{case:42s} threads={threads} ours={ours:9.1f}us "
                                    f"peer={peer:9.1f}us ratio={ratio:5.2f} {extra}")

"""pytest-benchmark glue over fastseg.benchmarking (shared with the ``fastseg bench`` command).

Each benchmark calls ``bench(group, impl, fn, ...)``. A group holds one shape's fastseg run and
its peers' (PyTorch eager, torch.compile, pydensecrf2, ...), measured side by side in one session;
at the end a table gives each one's median, fastseg's speed-up over each peer, and, where the bytes
moved or FLOPs are known, the achieved rate against this machine's measured copy bandwidth or GEMM
rate. ``FASTSEG_BENCH_JSON`` / ``FASTSEG_BENCH_PLOT`` name files to write the table to as JSON or
as a bar chart of speed-ups; ``FASTSEG_BENCH_THREADS`` sets torch's CPU threads.

``FASTSEG_BENCH_SMOKE=1`` swaps in tiny shapes (see ``shapes``): CI runs the suite that way, with
``--benchmark-disable``, so that every benchmark executes once and none rots.
"""
import os

import pytest
import torch

from fastseg import benchmarking
from fastseg.benchmarking import FASTSEG, shapes  # noqa: F401  (the benchmark files import these)

DEVICES = benchmarking.devices()
if os.environ.get("FASTSEG_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTSEG_BENCH_THREADS"]))

_results = []


def pytest_collection_modifyitems(config, items):
    # FASTSEG_BENCH_OPS (fastseg bench --ops): keep the selected ops' benchmarks; test_bench_atrous.py
    # holds two ops (atrous, aspp), so a file alone does not say.
    ops = os.environ.get("FASTSEG_BENCH_OPS")
    if not ops:
        return
    from fastseg.cli import bench_op_of

    wanted = set(ops.split(","))
    keep = [item for item in items if bench_op_of(item.path.name, item.name) in wanted]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def _synchronizing(fn, device):
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture
def bench(benchmark):
    def run(group, impl, fn, *, device="cpu", bytes_moved=None, flops=None):
        benchmark.group = group
        benchmark.extra_info.update(impl=impl, device=device, bytes_moved=bytes_moved, flops=flops)
        timed = _synchronizing(fn, device)
        if not benchmark.disabled:  # CI's smoke run executes each benchmark once
            benchmarking.warm_up(timed)
        result = benchmark(timed)
        if benchmark.stats is not None:
            _results.append(benchmarking.Result(
                group=group, impl=impl, device=device, median_s=benchmark.stats.stats.median,
                bytes_moved=bytes_moved, flops=flops,
            ))
        return result

    return run


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    peaks = benchmarking.machine_peaks(sorted({r.device for r in _results}))
    table = benchmarking.rows(_results, peaks)
    terminalreporter.section("fastseg: medians, speed-ups (peer median / fastseg median), roofline")
    for line in benchmarking.format_table(table, peaks).splitlines():
        terminalreporter.write_line(line)
    from fastseg import _backends

    if not _backends.EXTENSION_LOADED and "cpu" in peaks:
        terminalreporter.write_line(f"NOTE: fastseg._C is not loaded ({_backends.EXTENSION_ERROR}): the fastseg "
                                    "rows on the CPU timed the plain-PyTorch references", red=True)
    if os.environ.get("FASTSEG_BENCH_JSON"):
        benchmarking.write_json(os.environ["FASTSEG_BENCH_JSON"], table, peaks)
        terminalreporter.write_line(f"wrote {os.environ['FASTSEG_BENCH_JSON']}")
    if os.environ.get("FASTSEG_BENCH_PLOT"):
        benchmarking.write_plot(os.environ["FASTSEG_BENCH_PLOT"], table)
        terminalreporter.write_line(f"wrote {os.environ['FASTSEG_BENCH_PLOT']}")

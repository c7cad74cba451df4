"""Shared benchmark machinery.

Each benchmark calls ``bench(group, impl, fn, ...)``. A group holds one shape's fastseg run and
its peers' (PyTorch eager, torch.compile, pydensecrf2, ...), measured side by side in one session;
at the end a table gives each one's median, fastseg's speed-up over each peer, and, where the bytes
an op must move are known, the achieved bandwidth against this machine's measured copy bandwidth.

``FASTSEG_BENCH_SMOKE=1`` swaps in tiny shapes (see ``shapes``): CI runs the suite that way, with
``--benchmark-disable``, so that every benchmark executes once and none rots.
"""
import os
import statistics
import time

import pytest
import torch

SMOKE = os.environ.get("FASTSEG_BENCH_SMOKE") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FASTSEG = "fastseg"

_results = []  # dicts: group, impl, median_s, bytes_moved, flops, device


def shapes(full, smoke):
    """The real shapes, or tiny ones in smoke mode."""
    return smoke if SMOKE else full


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
        result = benchmark(_synchronizing(fn, device))
        if benchmark.stats is not None:
            _results.append(dict(
                group=group, impl=impl, device=device, median_s=benchmark.stats.stats.median,
                bytes_moved=bytes_moved, flops=flops,
            ))
        return result

    return run


def copy_bandwidth(device, nbytes=256 << 20, rounds=7):
    """Achievable memory bandwidth (bytes read + written per second) of a large tensor copy."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[1:])


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    write = terminalreporter.write_line
    bandwidth = {d: copy_bandwidth(d) for d in {r["device"] for r in _results if r["bytes_moved"]}}
    terminalreporter.section("fastseg: medians and speed-ups (peer median / fastseg median)")
    for device, bw in bandwidth.items():
        write(f"measured copy bandwidth on {device}: {bw / 1e9:.1f} GB/s (read + write)")
    write(f"{'group':<52} {'impl':<16} {'median ms':>10} {'speed-up':>9} {'GB/s':>7} {'% copy':>7} {'GFLOP/s':>8}")
    groups = {}
    for r in _results:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        ours = next((r for r in rows if r["impl"] == FASTSEG), None)
        for r in sorted(rows, key=lambda r: r["impl"] != FASTSEG):
            speedup = f"{r['median_s'] / ours['median_s']:.2f}x" if ours and r is not ours else ""
            gbs = pct = gflops = ""
            if r["bytes_moved"]:
                rate = r["bytes_moved"] / r["median_s"]
                gbs = f"{rate / 1e9:.1f}"
                pct = f"{100 * rate / bandwidth[r['device']]:.0f}%"
            if r["flops"]:
                gflops = f"{r['flops'] / r['median_s'] / 1e9:.1f}"
            write(f"{group:<52} {r['impl']:<16} {1e3 * r['median_s']:>10.2f} {speedup:>9} {gbs:>7} {pct:>7} {gflops:>8}")

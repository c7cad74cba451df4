"""Benchmark machinery shared by the pytest-benchmark suite (``benchmarks/``) and ``fastseg bench``.

Each measurement is a :class:`Result`: an op's group (one shape, layout, dtype and device), the
implementation (``fastseg`` or a peer), its median time, and where known the bytes it must move
or the floating-point operations it performs. From those and the machine's measured ceilings
(:func:`machine_peaks`: a large tensor copy and a large GEMM) the summary reports fastseg's
speed-up over each peer and each run's fraction of the relevant ceiling: the roofline.

Modes, from the environment (``fastseg bench`` sets them): ``FASTSEG_BENCH_SMOKE=1`` tiny shapes
(CI), ``FASTSEG_BENCH_QUICK=1`` a reduced set of real shapes, ``FASTSEG_BENCH_DEVICE=cpu|cuda``.
"""
import dataclasses
import json
import os
import platform
import statistics
import time

import torch

FASTSEG = "fastseg"
SMOKE = os.environ.get("FASTSEG_BENCH_SMOKE") == "1"
QUICK = os.environ.get("FASTSEG_BENCH_QUICK") == "1"


def shapes(full, smoke, quick=None):
    """The benchmark's shapes for this mode: ``full``, tiny ``smoke`` ones, or ``quick`` (default:
    the first of ``full``)."""
    if SMOKE:
        return smoke
    if QUICK:
        return quick if quick is not None else full[:1]
    return full


def devices():
    """Devices to benchmark on: FASTSEG_BENCH_DEVICE, else the CPU and, if present, CUDA."""
    chosen = os.environ.get("FASTSEG_BENCH_DEVICE")
    if chosen:
        return [chosen]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dtypes(device):
    """fp32 everywhere; on a GPU also the half types segmentation models run in."""
    return [torch.float32] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def compiled(fn, device):
    """The torch.compile peer: default mode on the CPU, max-autotune on a GPU.

    A benchmark file compiles one function for all its shapes, layouts and dtypes: more graphs than
    dynamo's default of 8 per function, past which it would run the rest eagerly, silently. The
    limit is raised, and reaching it is an error rather than an eager row labelled torch.compile."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name before torch 2.7: cache_size_limit
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name):
            setattr(config, name, True)
    return torch.compile(fn, dynamic=False, mode="max-autotune" if device == "cuda" else None)


@dataclasses.dataclass
class Result:
    group: str
    impl: str
    device: str
    median_s: float
    bytes_moved: float = None
    flops: float = None


def warm_up(fn, calls=5, seconds=2.0):
    """Up to `calls` calls before timed rounds, stopping after `seconds`: one-time work (oneDNN's
    primitives, a full weight cache making room for new transforms, which takes a few calls) stays
    out of the medians, for fastseg and its peers alike."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        if time.perf_counter() - start > seconds:
            break


def _median_time(fn, device, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first round warms caches and the allocator


def copy_bandwidth(device, nbytes=256 << 20):
    """Bytes read + written per second by a large tensor copy."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_time(lambda: dst.copy_(src), device, rounds=7)


def gemm_rate(device, n=None):
    """FLOP/s of a large fp32 matrix product (fp16 on CUDA: what tensor cores reach)."""
    n = n or (2048 if device == "cpu" else 8192)
    dtype = torch.float32 if device == "cpu" else torch.float16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _median_time(lambda: a @ b, device, rounds=5)


def machine_peaks(device_list):
    """{device: {'copy_bytes_per_s': ..., 'gemm_flops_per_s': ...}} measured now."""
    return {d: {"copy_bytes_per_s": copy_bandwidth(d), "gemm_flops_per_s": gemm_rate(d)} for d in device_list}


def rows(results, peaks):
    """Summary rows: fastseg first in each group, then its peers with fastseg's speed-up."""
    groups = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)
    out = []
    for group, members in groups.items():
        ours = next((r for r in members if r.impl == FASTSEG), None)
        for r in sorted(members, key=lambda r: r.impl != FASTSEG):
            peak = peaks.get(r.device, {})
            row = dict(dataclasses.asdict(r), speedup=None, gb_per_s=None, gflop_per_s=None, pct_of_peak=None)
            if ours is not None and r is not ours:
                row["speedup"] = r.median_s / ours.median_s
            if r.bytes_moved:
                row["gb_per_s"] = r.bytes_moved / r.median_s / 1e9
                if peak:
                    row["pct_of_peak"] = 100 * r.bytes_moved / r.median_s / peak["copy_bytes_per_s"]
            if r.flops:
                row["gflop_per_s"] = r.flops / r.median_s / 1e9
                if peak:
                    row["pct_of_peak"] = 100 * r.flops / r.median_s / peak["gemm_flops_per_s"]
            out.append(row)
    return out


def format_table(table_rows, peaks):
    lines = []
    for device, peak in peaks.items():
        lines.append(
            f"{device}: copy {peak['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), "
            f"GEMM {peak['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s ({'fp32' if device == 'cpu' else 'fp16'})"
        )
    lines.append(
        f"{'group':<54} {'impl':<16} {'median ms':>10} {'fastseg speed-up':>16} {'GB/s':>7} {'GFLOP/s':>8} {'% peak':>7}"
    )
    if any(r["gflop_per_s"] for r in table_rows):
        lines.insert(-1, "GFLOP/s count every tap a direct convolution computes (the zero padding included), so "
                         "a path that skips work (taps in the padding, Winograd) can pass 100% of the GEMM rate")

    def cell(value, fmt):
        return "" if value is None else format(value, fmt)

    for r in table_rows:
        lines.append(
            f"{r['group']:<54} {r['impl']:<16} {1e3 * r['median_s']:>10.3f} "
            f"{cell(r['speedup'], '.2f') + ('x' if r['speedup'] else ''):>16} {cell(r['gb_per_s'], '.1f'):>7} "
            f"{cell(r['gflop_per_s'], '.1f'):>8} {cell(r['pct_of_peak'], '.0f') + ('%' if r['pct_of_peak'] else ''):>7}"
        )
    return "\n".join(lines)


def environment():
    """Versions and hardware, for the JSON report."""
    import fastseg
    from fastseg import _backends

    info = dict(
        fastseg=fastseg.__version__, torch=torch.__version__, python=platform.python_version(),
        machine=platform.machine(), processor=_cpu_name(), cpu_threads=torch.get_num_threads(),
        cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        extension_loaded=_backends.EXTENSION_LOADED, cuda_kernels=bool(_backends.CUDA_COMPILED),
        cpu_isa=_backends.cpu_isa(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    from importlib import metadata

    for package in ("triton", "pydensecrf2", "torchvision", "segmentation-models-pytorch", "pytest-benchmark"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def write_json(path, table_rows, peaks):
    with open(path, "w") as f:
        json.dump(dict(schema="fastseg-bench/1", environment=environment(), peaks=peaks, results=table_rows), f, indent=2)


def write_plot(path, table_rows):
    """A bar chart of fastseg's speed-up over each peer: one row per group (op and shape), one bar per
    peer in it, drawn from parity (1x) on a log axis, so that 0.8x and 1.25x are bars of one length
    on either side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in table_rows if r["speedup"] is not None]
    if not measured:
        raise ValueError("nothing to plot: no group measured fastseg beside a peer")
    groups = list(dict.fromkeys(r["group"] for r in measured))
    peers = list(dict.fromkeys(r["impl"] for r in measured))
    colors = {peer: plt.get_cmap("tab10")(i % 10) for i, peer in enumerate(peers)}
    fig, ax = plt.subplots(figsize=(10, 0.22 * len(groups) + 1.6))
    for y, group in enumerate(groups):
        rows = [r for r in measured if r["group"] == group]
        height = 0.8 / len(rows)
        for i, r in enumerate(rows):
            offset = (i - (len(rows) - 1) / 2) * height
            ax.barh(y + offset, r["speedup"] - 1.0, left=1.0, height=height, color=colors[r["impl"]])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    values = [r["speedup"] for r in measured] + [1.0]
    ticks = [t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50, 100)
             if min(values) / 1.3 <= t <= max(values) * 1.3]
    ax.set_xlim(min(values) / 1.15, max(values) * 1.15)
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(range(len(groups)), groups, fontsize=6)
    ax.set_ylim(len(groups) - 0.5, -0.5)
    ax.set_xlabel("fastseg speed-up (peer median / fastseg median; right of the line: fastseg faster)")
    ax.set_title(f"fastseg {environment()['fastseg']} on {_cpu_name() or 'this machine'}", fontsize=9)
    ax.legend(handles=[matplotlib.patches.Patch(color=colors[p], label=f"vs {p}") for p in peers], fontsize=7,
              loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""unpool_conv2d (max-unpooling, 3x3 conv, folded BatchNorm, ReLU in one op) against eager
``F.max_unpool2d -> F.conv2d -> F.batch_norm -> F.relu`` and the same chain under torch.compile.

Shapes: the first convolution of each decoder stage of VGG-16 SegNet (Badrinarayanan et al., TPAMI
2017) at a 360x480 (CamVid) and a 224x224 input, C -> C channels at the unpooled size: 512 at
45x60 (unpooled from 22x30, output_size given: 45 is odd), 256 at 90x120, 128 at 180x240, 64 at
360x480; 512 at 28x28, 256 at 56x56, 128 at 112x112, 64 at 224x224. FLOPs are the dense
2 * B * H * W * C * C * 9 of the convolution.

Peak memory is not a pytest-benchmark figure: ``python benchmarks/test_bench_unpool_conv.py
--memory`` runs each implementation once per shape in a fresh process and prints the growth of the
process's peak resident set (ru_maxrss) over its value just before the call.
"""
import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastseg
from conftest import DEVICES, FASTSEG, shapes
from fastseg.benchmarking import compiled, dtypes

# (B, C, H, W) of the unpooled map.
SEGNET_SHAPES = shapes(
    [(1, 512, 45, 60), (1, 256, 90, 120), (1, 128, 180, 240), (1, 64, 360, 480),
     (4, 512, 28, 28), (4, 256, 56, 56), (4, 128, 112, 112), (4, 64, 224, 224)],
    [(1, 4, 9, 11), (2, 3, 8, 8)],
    [(1, 128, 90, 120)],
)
CASES = [(device, dtype) for device in DEVICES for dtype in dtypes(device)]
IMPLS = [FASTSEG, "torch eager", "torch.compile"]


def _unpool_conv_bn_relu(values, indices, w, mean, var, gamma, beta, size):
    unpooled = F.max_unpool2d(values, indices, 2, output_size=size)
    return F.relu(F.batch_norm(F.conv2d(unpooled, w, None, 1, 1), mean, var, gamma, beta, False, 0.0, 1e-5))


@functools.lru_cache(maxsize=None)
def _peer(impl, device, fn):
    return fn if impl == "torch eager" else compiled(fn, device)


def _problem(shape, layout, device, dtype):
    B, C, H, W = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=gen)
    values, indices = F.max_pool2d(x, 2, return_indices=True)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    values, indices = values.contiguous(memory_format=fmt), indices.contiguous(memory_format=fmt)
    w = (torch.randn(C, C, 3, 3, generator=gen) / (9 * C) ** 0.5).contiguous(memory_format=fmt)
    mean, gamma, beta = (torch.randn(C, generator=gen) for _ in range(3))
    var = torch.rand(C, generator=gen) + 0.5
    t = dict(values=values, w=w, mean=mean, var=var, gamma=gamma, beta=beta)
    t = {k: v.to(device, dtype) for k, v in t.items()}
    t["indices"] = indices.to(device)
    t["scale"] = t["gamma"] * torch.rsqrt(t["var"] + 1e-5)
    t["shift"] = t["beta"] - t["mean"] * t["scale"]
    return t


def _fn(impl, t, size, device):
    if impl == FASTSEG:
        return lambda: fastseg.unpool_conv2d(t["values"], t["indices"], t["w"], kernel_size=2, output_size=size,
                                             scale=t["scale"], shift=t["shift"], activation="relu")
    peer = _peer(impl, device, _unpool_conv_bn_relu)
    return lambda: peer(t["values"], t["indices"], t["w"], t["mean"], t["var"], t["gamma"], t["beta"], size)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SEGNET_SHAPES, ids=lambda s: "B{}-C{}-{}x{}".format(*s))
@pytest.mark.parametrize("device,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_unpool_conv_bn_relu(bench, device, dtype, shape, layout, impl):
    B, C, H, W = shape
    t = _problem(shape, layout, device, dtype)
    name = "B{} C{} {}x{} {} {}".format(B, C, H, W, layout, str(dtype).replace("torch.", ""))
    with torch.no_grad():
        out = bench(f"unpool+conv+BN+ReLU {name} {device}", impl, _fn(impl, t, (H, W), device), device=device,
                    flops=2 * B * H * W * C * C * 9)
    assert out.shape == (B, C, H, W)


# --- peak memory ----------------------------------------------------------------------------------


def _peak_growth_mib(impl, shape, layout):
    """Runs in a fresh process: peak RSS growth of one call, in MiB."""
    B, C, H, W = shape
    t = _problem(shape, layout, "cpu", torch.float32)
    fn = _fn(impl, t, (H, W), "cpu")
    with torch.no_grad():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _status_kib("VmRSS")
        out = fn()
        after = _status_kib("VmHWM")
    del out
    return (after - before) / 1024


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_table(layout):
    shapes_ = [s for s in SEGNET_SHAPES]
    print(f"peak RSS growth during one call over the RSS before it, fresh process per figure, fp32, {layout}")
    print("| shape | unpooled map | output | fastseg | torch eager | saved |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in shapes_:
        B, C, H, W = shape
        figures = {}
        for impl in (FASTSEG, "torch eager"):
            run = subprocess.run(
                [sys.executable, __file__, "--one", impl, ",".join(map(str, shape)), layout],
                capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)),
            )
            figures[impl] = float(run.stdout.strip().splitlines()[-1])
        mib = B * C * H * W * 4 / 2**20
        print(f"| {B}x{C}x{H}x{W} | {mib:.1f} MiB | {mib:.1f} MiB | {figures[FASTSEG]:.1f} MiB | "
              f"{figures['torch eager']:.1f} MiB | {figures['torch eager'] - figures[FASTSEG]:.1f} MiB |")


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        torch.set_num_threads(int(os.environ.get("FASTSEG_BENCH_THREADS", torch.get_num_threads())))
        print(_peak_growth_mib(sys.argv[2], tuple(int(v) for v in sys.argv[3].split(",")), sys.argv[4]))
    elif sys.argv[1] == "--memory":
        for layout in ("nchw", "channels_last"):
            _memory_table(layout)

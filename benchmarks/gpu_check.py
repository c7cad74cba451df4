"""One pass over every GPU path on a lent CUDA device: correctness on fresh random inputs, then
medians against PyTorch eager (cuDNN), each pair timed back to back twice (A B A B) so the spread
between the two timings of one implementation shows the noise.

    python benchmarks/gpu_check.py [--out DIR] [--data DIR] [SECTION ...]

Sections: peaks atrous atrous_routes layers aspp gcn gcn_layer unpool unpool_conv crf crf_train
crf_images profile (default: all, in that order). Every section is independent; one that fails prints its traceback
and the rest go on. Each result is printed as it comes and is a line of ``DIR/gpu_check.jsonl``.
``--dry-run`` runs the script on the CPU with tiny shapes (Triton under the interpreter), to check
the script itself before spending device time.

Correctness: every fastseg output is computed once with fresh allocations poisoned (torch's
deterministic-mode fill: NaN for floats), and compared against a float64 reference on the device
as ||out - ref|| / ||ref||; unpooling is compared bit for bit with ``F.max_unpool2d``.
'fastseg' is the op or layer as called by default ('auto': on CUDA, cuDNN's fused kernel for
atrous_conv2d, the taps route for ASPP in half precision, padded channels for GlobalConv2d); other
columns are routes by name (the Triton implicit-GEMM kernels only with GPU_CHECK_TRITON=1). Timing:
``triton.testing.do_bench`` medians (CUDA events, L2 flushed between calls), cuDNN with
``torch.backends.cudnn.benchmark = True`` so eager gets its best algorithm.
Results of the runs (an H200, 2026-11-26 and -27): benchmarks/gpu_runs/ and RESULTS.md, "GPU".
"""
import argparse
import contextlib
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

if "--dry-run" in sys.argv:  # Triton on CPU tensors: the interpreter must be on before triton loads
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastseg  # noqa: E402
import fastseg.crf  # noqa: E402
# The peers as the pytest-benchmark suite defines them (this file sits beside it).
from test_bench_atrous import _conv_bn_relu, _plain_aspp  # noqa: E402
from test_bench_dense_crf import _inputs as _crf_inputs  # noqa: E402
from test_bench_gcn import _four_convs  # noqa: E402
from test_bench_unpool_conv import _unpool_conv_bn_relu  # noqa: E402

OUT_DIR = Path(".")
# The Triton convolution kernels lost to cuDNN everywhere on the first run (RESULTS.md, "GPU"): they
# are timed again only with GPU_CHECK_TRITON=1 (their autotuning costs minutes of device time).
TIME_TRITON = os.environ.get("GPU_CHECK_TRITON") == "1"
# GPU_CHECK_DTYPES=float16,float32 narrows the aspp, gcn and gcn_layer sections to those dtypes.
_ONLY = os.environ.get("GPU_CHECK_DTYPES")
ONLY_DTYPES = None if not _ONLY else {getattr(torch, name) for name in _ONLY.split(",")}


def wanted(dtype):
    return ONLY_DTYPES is None or dtype in ONLY_DTYPES
DEV = "cuda"  # --dry-run: "cpu", tiny shapes, to check this script itself without a GPU


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def log(**row):
    with open(OUT_DIR / "gpu_check.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


@contextlib.contextmanager
def poisoned():
    import torch.utils.deterministic

    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def memory_allocated():
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def max_memory_allocated():
    return torch.cuda.max_memory_allocated() if DEV == "cuda" else 0


def reset_peak():
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def rel_error(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def median_ms(fn):
    if DEV != "cuda":
        return _time_wall(fn, 3)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def versus(name, fns, **extra):
    """Time each of ``fns`` (dict impl -> callable; the first is fastseg) twice, interleaved."""
    for fn in fns.values():  # compile / autotune outside the timing
        fn()
        fn()
    sync()
    times = {impl: [] for impl in fns}
    for _ in range(2):
        for impl, fn in fns.items():
            times[impl].append(median_ms(fn))
    first = next(iter(fns))
    row = dict(name=name, **{f"{impl} ms": min(t) for impl, t in times.items()},
               **{f"{impl} spread": max(t) / min(t) for impl, t in times.items()})
    for impl in list(fns)[1:]:
        row[f"x vs {impl}"] = min(times[impl]) / min(times[first])
    flops = extra.pop("flops", None)
    if flops:
        row["fastseg TFLOP/s"] = flops / (min(times[first]) * 1e-3) / 1e12
    row.update(extra)
    log(**row)
    return row


def channels_last(t, on=True):
    return t.contiguous(memory_format=torch.channels_last if on else torch.contiguous_format)


# --- sections ----------------------------------------------------------------------------------------


PEAK_N, PEAK_GEMM = 1 << 28, 8192  # 1 GiB of float32 copied; an 8192^3 product


def section_peaks():
    n = PEAK_N
    a = torch.empty(n, device=DEV)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a))
    log(name="peak copy", **{"GB/s": 2 * 4 * n / (ms * 1e-3) / 1e9})
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(PEAK_GEMM, PEAK_GEMM, device=DEV, dtype=dtype)
        y = torch.randn(PEAK_GEMM, PEAK_GEMM, device=DEV, dtype=dtype)
        ms = median_ms(lambda: x @ y)
        log(name=f"peak GEMM {PEAK_GEMM}^3 {str(dtype)[6:]} (tf32={torch.backends.cuda.matmul.allow_tf32})",
            **{"TFLOP/s": 2 * PEAK_GEMM ** 3 / (ms * 1e-3) / 1e12})




# (B, C, H, rate) with 256 outputs: DeepLab's 33x33 / 65x65 / 129x129 maps.
ATROUS_SHAPES = [(1, 256, 65, 12), (8, 256, 65, 12), (8, 256, 65, 36), (8, 512, 33, 18), (8, 256, 33, 24),
                 (8, 2048, 33, 2), (8, 1024, 65, 2), (8, 256, 129, 6), (8, 2048, 65, 12)]
ATROUS_VARIANTS = [(torch.float16, True), (torch.bfloat16, True), (torch.float16, False), (torch.float32, True)]


def section_atrous():
    for dtype, cl in ATROUS_VARIANTS:
        shapes = ATROUS_SHAPES if (dtype, cl) == ATROUS_VARIANTS[0] else ATROUS_SHAPES[1:4]
        for B, C, H, rate in shapes:
            O = min(256, 4 * C)
            x = channels_last(torch.randn(B, C, H, H, device=DEV), cl).to(dtype)
            w = (torch.randn(O, C, 3, 3, device=DEV) / (9 * C) ** 0.5).to(dtype)
            mean, gamma, beta = (torch.randn(O, device=DEV).to(dtype) for _ in range(3))
            var = (torch.rand(O, device=DEV) + 0.5).to(dtype)
            scale = gamma * torch.rsqrt(var + 1e-5)
            shift = beta - mean * scale
            fast = lambda backend="auto": fastseg.atrous_conv2d(x, w, dilation=rate, padding=rate, scale=scale,
                                                                shift=shift, activation="relu", backend=backend)
            ref = F.relu(F.conv2d(x.double(), w.double(), None, 1, rate, rate) * scale.double().view(1, -1, 1, 1)
                         + shift.double().view(1, -1, 1, 1))
            fns = {"fastseg": fast}
            if TIME_TRITON:
                fns["triton"] = lambda: fast("triton")
            fns["eager"] = lambda: _conv_bn_relu(x, w, mean, var, gamma, beta, rate)
            with poisoned(), torch.no_grad():
                errors = {f"{impl} err": rel_error(fn(), ref) for impl, fn in fns.items() if impl != "eager"}
                out = fast()
            layout_ok = out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            with torch.no_grad():
                versus(f"atrous B{B} C{C}->{O} {H}x{H} rate{rate} {str(dtype)[6:]} {'CL' if cl else 'NCHW'}", fns,
                       flops=2 * B * H * H * O * C * 9, layout_ok=layout_ok, **errors)


# More shapes for choosing between cuDNN's fused kernel and a folded convolution + in-place ReLU:
# batch 1 of each DeepLab shape, a ResNet stage's 3x3 (512 -> 512 at rate 2 and 4) and 1x1 convs.
ROUTE_SHAPES = ATROUS_SHAPES + [(1, 2048, 65, 12), (1, 1024, 65, 2), (1, 256, 129, 6), (1, 512, 33, 18),
                                (8, 512, 65, 2), (8, 512, 65, 4), (1, 512, 65, 4), (8, 512, 129, 2)]
ROUTE_ONE_BY_ONE = [(8, 2048, 65, 256), (1, 2048, 65, 256), (8, 1024, 65, 256), (8, 256, 65, 1024)]


def section_atrous_routes():
    """Where each cuDNN route stands: BatchNorm folded into the weights and bias, then cuDNN's own
    fused convolution + bias + ReLU (torch.cudnn_convolution_relu), or the folded convolution and
    an in-place ReLU, against eager conv -> batch_norm -> relu; 'auto' is fastseg.atrous_conv2d
    as called (its folding and checks included)."""
    cases = [(s, 3, dt) for s in ROUTE_SHAPES for dt in (torch.float16,)]
    cases += [(s, 3, dt) for s in ROUTE_SHAPES[:4] for dt in (torch.bfloat16, torch.float32)]
    cases += [((B, C, H, 1), 1, torch.float16) for B, C, H, O in ROUTE_ONE_BY_ONE]
    for (B, C, H, rate), k, dtype in cases:
        O = min(256, 4 * C) if k == 3 else dict(((b, c, h), o) for b, c, h, o in ROUTE_ONE_BY_ONE)[B, C, H]
        pad = rate if k == 3 else 0
        x = channels_last(torch.randn(B, C, H, H, device=DEV)).to(dtype)
        w = (torch.randn(O, C, k, k, device=DEV) / (k * k * C) ** 0.5).to(dtype)
        mean, gamma, beta = (torch.randn(O, device=DEV).to(dtype) for _ in range(3))
        var = (torch.rand(O, device=DEV) + 0.5).to(dtype)
        scale = gamma.float() * torch.rsqrt(var.float() + 1e-5)
        shift = (beta.float() - mean.float() * scale).to(dtype)
        w_folded = channels_last((w.float() * scale.view(-1, 1, 1, 1)).to(dtype))
        scale = scale.to(dtype)
        fns = {"auto": lambda: fastseg.atrous_conv2d(x, w, dilation=rate, padding=pad, scale=scale, shift=shift,
                                                     activation="relu"),
               "cudnn fused": lambda: torch.cudnn_convolution_relu(x, w_folded, shift, [1, 1], [pad, pad],
                                                                    [rate, rate], 1),
               "folded conv+relu_": lambda: F.relu_(F.conv2d(x, w_folded, shift, 1, pad, rate)),
               "eager": lambda: F.relu(F.batch_norm(F.conv2d(x, w, None, 1, pad, rate), mean, var, gamma, beta,
                                                    False, 0.0, 1e-5))}
        if DEV != "cuda":  # cuDNN only on a GPU; the CPU has no half convolution either
            break
        with torch.no_grad():
            ref = F.relu(F.conv2d(x.double(), w.double(), None, 1, pad, rate) * scale.double().view(1, -1, 1, 1)
                         + shift.double().view(1, -1, 1, 1))
            errors = {f"{k_} err": rel_error(fn(), ref) for k_, fn in fns.items()}
            versus(f"atrous routes B{B} C{C}->{O} {H}x{H} k{k} rate{rate} {str(dtype)[6:]} CL", fns,
                   flops=2 * B * H * H * O * C * k * k, **errors)


LAYER_SHAPES = [(1, 256, 256, 65, 12), (8, 256, 256, 65, 12), (1, 2048, 256, 65, 24), (8, 512, 512, 65, 2),
                (1, 512, 512, 65, 2)]


def section_layers():
    """fastseg.nn.AtrousConvBNReLU (eval) against the same Conv2d -> BatchNorm2d -> ReLU modules in
    eager PyTorch: the layer's own costs (its folded BatchNorm, remembered between calls) included."""
    for dtype in (torch.float16, torch.float32):
        for B, C, O, H, rate in LAYER_SHAPES:
            torch.manual_seed(0)
            layer = fastseg.nn.AtrousConvBNReLU(C, O, 3, dilation=rate)
            for m in layer.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 1.5)
            layer = layer.eval().to(DEV, dtype)
            plain = torch.nn.Sequential(layer.conv, layer.bn, torch.nn.ReLU())
            x = channels_last(torch.randn(B, C, H, H, device=DEV)).to(dtype)
            with torch.no_grad():
                ref = plain.double()(x.double())
                plain.to(dtype)
                with poisoned():
                    out = layer(x)
                versus(f"layer AtrousConvBNReLU B{B} {C}->{O} {H}x{H} rate{rate} {str(dtype)[6:]} CL",
                       {"fastseg": lambda: layer(x), "eager": lambda: plain(x)},
                       flops=2 * B * H * H * O * C * 9, err=rel_error(out, ref))


PROFILE_CRF_HW = (375, 500)


def section_profile():
    """Where the time goes in one dense-CRF call and one small atrous call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    unary, image = _crf_inputs(1, *PROFILE_CRF_HW, 21)
    u, im = unary.to(DEV), image.to(DEV)
    crf_name = "crf_{}x{}_it10".format(*PROFILE_CRF_HW[::-1])
    calls = {crf_name: lambda: fastseg.dense_crf(u, im, iterations=10, unary="energy", backend="triton")}
    x = channels_last(torch.randn(1, 256, 65, 65, device=DEV)).half()
    w = (torch.randn(256, 256, 3, 3, device=DEV) / 48).half()
    scale, shift = torch.rand(256, device=DEV).half(), torch.randn(256, device=DEV).half()
    calls["atrous_B1_256_65x65_rate12"] = lambda: fastseg.atrous_conv2d(x, w, dilation=12, padding=12, scale=scale,
                                                                        shift=shift, activation="relu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    for name, fn in calls.items():
        with torch.no_grad():
            fn()
            sync()
            wall = _time_wall(fn, 5)
            with profile(activities=activities) as prof:
                fn()
                sync()
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if DEV == "cuda" else "self_cpu_time_total",
                                          row_limit=30)
        (OUT_DIR / f"profile_{name}.txt").write_text(table)
        events = prof.key_averages()
        gpu_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
        launches = sum(e.count for e in events if "launch" in e.key.lower() or "LaunchKernel" in e.key)
        log(name=f"profile {name}", **{"wall ms": wall, "gpu busy ms": gpu_us / 1e3, "launch calls": launches})




ASPP_CASE = (2048, 65, 256, None)  # C in, H = W, C out, rates (None: the version's)


def section_aspp():
    from fastseg.kernels import taps_conv

    C, H, O, _ = ASPP_CASE
    for version, rates, out_channels in (("v3", (12, 24, 36), O), ("v2", (6, 12, 18, 24), O),
                                         ("v2", (6, 12, 18, 24), 21)):
        rates = ASPP_CASE[3] or rates
        for B in (1, 8):
            for dtype in [d for d in (torch.float16, torch.float32) if wanted(d)]:
                torch.manual_seed(0)
                aspp = fastseg.nn.ASPP(C, out_channels, version=version, rates=rates).eval().to(DEV)
                for m in aspp.modules():  # non-trivial BatchNorm statistics
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.normal_()
                        m.running_var.uniform_(0.5, 1.5)
                        m.weight.data.normal_()
                        m.bias.data.normal_()
                x = channels_last(torch.randn(B, C, H, H, device=DEV))
                with torch.no_grad():
                    ref = _plain_aspp(aspp.double(), x.double())
                    aspp = aspp.to(dtype)
                    xd = x.to(dtype)
                    fns = {"fastseg": lambda: aspp(xd)}
                    if version == "v2":
                        ws = [c.weight for c in aspp.branches]
                        dil = [c.dilation for c in aspp.branches]
                        bias = sum(c.bias for c in aspp.branches)
                        fns["taps"] = lambda: taps_conv.conv_sum(xd, ws, dil, bias)
                    chain = copy.deepcopy(aspp)  # each branch through cuDNN's fused kernel
                    for m in chain.modules():
                        if hasattr(m, "backend"):
                            m.backend = "cudnn" if DEV == "cuda" else "reference"
                    fns["cudnn"] = lambda: chain(xd)
                    fns["eager"] = lambda: _plain_aspp(aspp, xd)
                    with poisoned():
                        errors = {f"{impl} err": rel_error(fn(), ref) for impl, fn in fns.items() if impl != "eager"}
                    versus(f"ASPP {version} {rates} B{B} {C}->{out_channels} {H}x{H} {str(dtype)[6:]} CL", fns,
                           **errors)




# (B, Cin, H, Cmid, Cout, k): a ResNet's stages at a 512x512 input, VOC's 21 classes, k = 15.
GCN_SHAPES = [(1, 2048, 16, 21, 21, 15), (1, 1024, 32, 21, 21, 15), (1, 512, 64, 21, 21, 15),
              (1, 256, 128, 21, 21, 15), (1, 256, 64, 256, 256, 15), (8, 2048, 16, 21, 21, 15),
              (8, 512, 64, 21, 21, 15), (8, 256, 128, 21, 21, 15), (8, 256, 64, 256, 256, 15)]


GCN_VARIANTS = ((torch.float16, True), (torch.bfloat16, True), (torch.float32, False))  # dtype, channels_last


def section_gcn():
    for dtype, cl in [v for v in GCN_VARIANTS if wanted(v[0])]:
        for B, Cin, H, Cm, Co, k in GCN_SHAPES if dtype != torch.bfloat16 else GCN_SHAPES[:3]:
            x = channels_last(torch.randn(B, Cin, H, H, device=DEV), cl).to(dtype)
            make = lambda *s: (torch.randn(*s, device=DEV) / (s[1] * k) ** 0.5).to(dtype)
            ws = [make(Cm, Cin, k, 1), make(Co, Cm, 1, k), make(Cm, Cin, 1, k), make(Co, Cm, k, 1)]
            bs = [torch.randn(n, device=DEV).to(dtype) for n in (Cm, Co, Cm, Co)]
            ref = _four_convs(x.double(), *[t.double() for t in ws + bs])
            op = torch.ops.fastseg.gcn_conv2d_triton
            fns = {"fastseg": lambda: fastseg.gcn_conv2d(x, *ws, *bs),
                   "taps": lambda: op(x, *ws, *bs, 1, "taps")}
            if TIME_TRITON:
                fns["implicit_gemm"] = lambda: op(x, *ws, *bs, 1, "implicit_gemm")
            if DEV == "cuda":
                fns["cudnn"] = lambda: fastseg.gcn_conv2d(x, *ws, *bs, backend="cudnn")
            fns["eager"] = lambda: _four_convs(x, *ws, *bs)
            with poisoned(), torch.no_grad():
                errors = {f"{impl} err": rel_error(fn(), ref) for impl, fn in fns.items() if impl != "eager"}
            with torch.no_grad():
                versus(f"gcn B{B} {Cin}->{Cm}->{Co} {H}x{H} k{k} {str(dtype)[6:]} {'CL' if cl else 'NCHW'}", fns,
                       flops=2 * B * H * H * k * (Cin * Cm + Cm * Co) * 2, **errors)


def section_gcn_layer():
    """fastseg.nn.GlobalConv2d (its padded weights kept between calls) against eager's four
    convolutions and add on the same weights."""
    for dtype, cl in [v for v in GCN_VARIANTS if wanted(v[0])]:
        for B, Cin, H, Cm, Co, k in GCN_SHAPES if dtype != torch.bfloat16 else GCN_SHAPES[:3]:
            torch.manual_seed(0)
            layer = fastseg.nn.GlobalConv2d(Cin, Co, k=k, mid_ch=Cm).to(DEV, dtype)
            x = channels_last(torch.randn(B, Cin, H, H, device=DEV), cl).to(dtype)
            convs = (layer.conv_l1, layer.conv_l2, layer.conv_r1, layer.conv_r2)
            ws, bs = [c.weight for c in convs], [c.bias for c in convs]
            with torch.no_grad():
                ref = _four_convs(x.double(), *[t.double() for t in ws + bs])
                with poisoned():
                    out = layer(x)
                versus(f"gcn layer B{B} {Cin}->{Cm}->{Co} {H}x{H} k{k} {str(dtype)[6:]} {'CL' if cl else 'NCHW'}",
                       {"fastseg": lambda: layer(x), "eager": lambda: _four_convs(x, *ws, *bs)},
                       flops=2 * B * H * H * k * (Cin * Cm + Cm * Co) * 2, err=rel_error(out, ref))


UNPOOL_SHAPES = [(8, 64, 360, 480), (8, 512, 45, 60), (16, 128, 180, 240)]
# 'aten' is F.max_unpool2d after fastseg's range check; 'auto' picks by layout (ops.unpool.cuda_backend).
UNPOOL_BACKENDS = ("auto",) + tuple(b for b in ("aten", "cuda", "triton")
                                    if fastseg._backends.unavailable_reason(b, "cuda") is None)


def section_unpool():
    for B, C, H, W in UNPOOL_SHAPES:
        for dtype in (torch.float16, torch.float32):
            for cl in (False, True):
                x = channels_last(torch.randn(B, C, H, W, device=DEV), cl).to(dtype)
                values, indices = F.max_pool2d(x, 2, return_indices=True)
                expected = F.max_unpool2d(values, indices, 2, output_size=(H, W))
                fns = {}
                for backend in UNPOOL_BACKENDS:
                    with poisoned():
                        out = fastseg.max_unpool2d(values, indices, 2, output_size=(H, W), backend=backend)
                    fns[backend] = (lambda b=backend: fastseg.max_unpool2d(values, indices, 2, output_size=(H, W),
                                                                           backend=b))
                    # Values compared bit for bit; the layouts may differ (ours follows the input's
                    # memory format, ATen's CUDA unpooling returns NCHW: seen on an H200).
                    log(name=f"unpool exact {backend} B{B} C{C} {H}x{W} {str(dtype)[6:]} {'CL' if cl else 'NCHW'}",
                        bit_equal=bool(torch.equal(out, expected)), same_strides=out.stride() == expected.stride(),
                        layout_follows_input=out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format))
                fns["eager"] = lambda: F.max_unpool2d(values, indices, 2, output_size=(H, W))
                bytes_moved = values.numel() * (values.element_size() + 8) + expected.numel() * expected.element_size()
                row = versus(f"unpool B{B} C{C} {H}x{W} {str(dtype)[6:]} {'CL' if cl else 'NCHW'}", fns)
                log(name=row["name"] + " bandwidth", **{f"{b} GB/s": bytes_moved / (row[f"{b} ms"] * 1e-3) / 1e9
                                                        for b in UNPOOL_BACKENDS + ("eager",)})


# SegNet's decoder stages (VGG-16, 360x480 CamVid input) at batch 4, and a 224x224 stage at 16.
UNPOOL_CONV_SHAPES = [(4, 512, 45, 60), (4, 256, 90, 120), (4, 128, 180, 240), (4, 64, 360, 480),
                      (16, 256, 56, 56)]




def section_unpool_conv():
    for dtype in (torch.float16, torch.float32):
        for B, C, H, W in UNPOOL_CONV_SHAPES:
            x = channels_last(torch.randn(B, C, H, W, device=DEV)).to(dtype)
            values, indices = F.max_pool2d(x, 2, return_indices=True)
            w = channels_last(torch.randn(C, C, 3, 3, device=DEV) / (9 * C) ** 0.5).to(dtype)
            mean, gamma, beta = (torch.randn(C, device=DEV).to(dtype) for _ in range(3))
            var = (torch.rand(C, device=DEV) + 0.5).to(dtype)
            scale = gamma * torch.rsqrt(var + 1e-5)
            shift = beta - mean * scale
            fast = lambda backend="triton": fastseg.unpool_conv2d(values, indices, w, kernel_size=2, output_size=(H, W),
                                                                  scale=scale, shift=shift, activation="relu",
                                                                  backend=backend)
            eager = lambda: _unpool_conv_bn_relu(values, indices, w, mean, var, gamma, beta, (H, W))
            # Routes by name: cuDNN's (unpool, then the fused convolution); the Triton kernel when asked
            # for (it lost on 2026-11-26), or in the dry run, where there is no cuDNN.
            routes = (["cudnn"] if DEV == "cuda" else []) + (["triton"] if TIME_TRITON or DEV != "cuda" else [])
            with torch.no_grad():
                unpooled = F.max_unpool2d(values.double(), indices, 2, output_size=(H, W))
                ref = F.relu(F.conv2d(unpooled, w.double(), None, 1, 1) * scale.double().view(1, -1, 1, 1)
                             + shift.double().view(1, -1, 1, 1))
                del unpooled
                errors, peaks = {}, {}
                for route in routes:
                    with poisoned():
                        errors[f"{route} err"] = rel_error(fast(route), ref)
                for impl, fn in [(r, lambda r=r: fast(r)) for r in routes] + [("eager", eager)]:
                    fn()
                    sync()
                    base = memory_allocated()
                    reset_peak()
                    y = fn()
                    sync()
                    peaks[f"{impl} peak MiB"] = (max_memory_allocated() - base) / 2 ** 20
                    del y
                fns = {"fastseg": lambda: fast("auto"), **{r: (lambda r=r: fast(r)) for r in routes}, "eager": eager}
                versus(f"unpool_conv B{B} C{C} {H}x{W} {str(dtype)[6:]} CL", fns,
                       flops=2 * B * H * W * C * C * 9, **errors, **peaks)




DEFAULT = (dict(sxy=3, compat=3), dict(sxy=80, srgb=13, compat=10))
VOC = (dict(sxy=3, compat=3), dict(sxy=67, srgb=3, compat=4))


def _time_wall(fn, repeats):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


# (name, B, H, W, iterations, kernels); iterations 0 times the lattice builds and the softmax alone.
CRF_CASES = [("500x375", 1, 375, 500, 5, DEFAULT), ("500x375", 1, 375, 500, 10, DEFAULT),
             ("500x375 VOC", 1, 375, 500, 10, VOC), ("500x375", 1, 375, 500, 0, DEFAULT),
             ("512x512", 1, 512, 512, 10, DEFAULT), ("16x512x512", 16, 512, 512, 10, DEFAULT),
             ("16x512x512", 16, 512, 512, 5, DEFAULT), ("16x512x512", 16, 512, 512, 0, DEFAULT)]
CRF_TRAIN_CASES = [("500x375", 1, 375, 500, 5), ("16x512x512", 16, 512, 512, 5)]


def section_crf():
    for name, B, H, W, it, (gaussian, bilateral) in CRF_CASES:
        unary, image = _crf_inputs(B, H, W, 21)
        u, im = unary.to(DEV), image.to(DEV)
        run = lambda backend, u=u, im=im: fastseg.dense_crf(u, im, iterations=it, gaussian=gaussian,
                                                            bilateral=bilateral, unary="energy", backend=backend)
        with torch.no_grad():
            gpu_ms = _time_wall(lambda: run("triton"), 7)
            extra = {}
            if B == 1:
                q_gpu = run("triton").cpu()
                cpu_start = time.perf_counter()
                q_cpu = fastseg.dense_crf(unary, image, iterations=it, gaussian=gaussian, bilateral=bilateral,
                                          unary="energy", backend="cpp")
                extra["device-cpu cpp ms"] = 1e3 * (time.perf_counter() - cpu_start)
                extra["labels equal"] = float((q_gpu.argmax(1) == q_cpu.argmax(1)).float().mean())
                extra["max |dQ|"] = float((q_gpu - q_cpu).abs().max())
        log(name=f"dense_crf triton {name} L21 it{it} forward", **{"wall ms (median of 7)": gpu_ms,
            "per image ms": gpu_ms / B}, **extra)


def section_crf_train():
    """Forward + backward of the learnable layer (CRF-as-RNN), stored and checkpointed iterates."""
    for name, B, H, W, it in CRF_TRAIN_CASES:
        unary, image = _crf_inputs(B, H, W, 21)
        for checkpoint in (False, True):
            crf = fastseg.nn.DenseCRF(it, *DEFAULT, unary="energy", num_labels=21, learnable=True,
                                      checkpoint=checkpoint, backend="triton").to(DEV)
            weights = torch.randn(unary.shape, device=DEV)
            scores = unary.to(DEV).requires_grad_()
            im = image.to(DEV)

            def step():
                (crf(scores, im) * weights).sum().backward()

            def forward():
                with torch.no_grad():
                    crf(scores, im)

            reset_peak()
            fb = _time_wall(step, 5)
            peak = max_memory_allocated() / 2 ** 20
            fw = _time_wall(forward, 5)
            log(name=f"dense_crf triton {name} L21 it{it} learnable checkpoint={checkpoint}",
                **{"forward ms": fw, "forward+backward ms": fb, "backward/forward": (fb - fw) / fw, "peak MiB": peak})


IMAGE_STEP = 1  # every pixel (--dry-run: every 12th)


def section_crf_images(data):
    import numpy as np
    from PIL import Image

    if not data or not Path(data).is_dir():
        log(name="dense_crf shared images", skipped=f"no data at {data}")
        return
    data = Path(data)
    for n in (1, 2, 3):
        image = np.array(Image.open(data / f"im{n}.png").convert("RGB"))[::IMAGE_STEP, ::IMAGE_STEP]
        anno = np.array(Image.open(data / f"anno{n}.png").convert("RGB")).astype(np.int64)[::IMAGE_STEP, ::IMAGE_STEP]
        flat = anno[..., 0] << 16 | anno[..., 1] << 8 | anno[..., 2]
        colours, labels = np.unique(flat, return_inverse=True)
        labels = labels.reshape(flat.shape) - (1 if colours[0] == 0 else 0)  # -1: unknown (black)
        L = int(labels.max()) + 1
        unary = torch.from_numpy(fastseg.crf.unary_from_labels(labels + 1, L, 0.7)).reshape(L, *labels.shape)
        img = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        for it in (5, 10):
            q_cpu = fastseg.dense_crf(unary, img, iterations=it, unary="energy", backend="cpp")
            with poisoned():
                q_gpu = fastseg.dense_crf(unary.to(DEV), img.to(DEV), iterations=it, unary="energy",
                                          backend="triton").cpu()
            log(name=f"dense_crf im{n} {tuple(labels.shape)} L{L} it{it} gpu vs cpu",
                **{"labels equal": float((q_gpu.argmax(0) == q_cpu.argmax(0)).float().mean()),
                   "max |dQ|": float((q_gpu - q_cpu).abs().max()), "mean |dQ|": float((q_gpu - q_cpu).abs().mean())})


def _shrink():
    global DEV, ATROUS_SHAPES, GCN_SHAPES, UNPOOL_SHAPES, UNPOOL_CONV_SHAPES, CRF_CASES, CRF_TRAIN_CASES, ASPP_CASE
    global UNPOOL_BACKENDS, PEAK_N, PEAK_GEMM, IMAGE_STEP, PROFILE_CRF_HW, ROUTE_SHAPES, ROUTE_ONE_BY_ONE, LAYER_SHAPES
    PROFILE_CRF_HW = (12, 16)
    IMAGE_STEP = 12
    DEV = "cpu"
    PEAK_N, PEAK_GEMM = 1 << 20, 256
    UNPOOL_BACKENDS = ("triton",)
    ATROUS_SHAPES = [(1, 8, 9, 2), (2, 4, 7, 6), (1, 3, 5, 1), (2, 8, 6, 3)]
    ROUTE_SHAPES, ROUTE_ONE_BY_ONE = ATROUS_SHAPES, [(1, 8, 9, 4)]
    LAYER_SHAPES = [(1, 8, 6, 9, 2), (2, 4, 4, 7, 3)]
    GCN_SHAPES = [(1, 8, 9, 4, 3, 7), (2, 6, 5, 3, 2, 15)]
    UNPOOL_SHAPES = [(2, 3, 8, 10)]
    UNPOOL_CONV_SHAPES = [(2, 4, 8, 10)]
    CRF_CASES = [("24x32", 1, 24, 32, 2, DEFAULT), ("2x24x32", 2, 24, 32, 2, DEFAULT)]
    CRF_TRAIN_CASES = [("24x32", 1, 24, 32, 2)]
    ASPP_CASE = (16, 9, 8, (1, 2))
    ATROUS_VARIANTS[:] = [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)]


SECTIONS = ["peaks", "atrous", "atrous_routes", "layers", "aspp", "gcn", "gcn_layer", "unpool", "unpool_conv", "crf",
            "crf_train", "crf_images", "profile"]


def main(argv=None):
    global OUT_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=" ".join(SECTIONS))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--data", default=None, help="folder of the dense-CRF example images")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script only")
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.sections = args.sections or SECTIONS
    OUT_DIR = Path(args.out)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        _shrink()
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (--dry-run checks the script on the CPU)")
    torch.backends.cudnn.benchmark = True
    device = torch.cuda.get_device_name() if DEV == "cuda" else "dry run on the CPU"
    print(f"# {device}  torch {torch.__version__}  fastseg._C: {fastseg._backends.EXTENSION_ERROR or 'loaded'}  "
          f"CUDA kernels: {fastseg._backends.CUDA_COMPILED}", flush=True)
    for section in args.sections:
        start = time.perf_counter()
        print(f"## {section}", flush=True)
        try:
            fn = globals()[f"section_{section}"]
            fn(args.data) if section == "crf_images" else fn()
        except Exception:
            traceback.print_exc()
            log(name=f"section {section}", failed=traceback.format_exc().splitlines()[-1])
        print(f"## {section} took {time.perf_counter() - start:.1f} s", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

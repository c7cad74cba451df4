"""Side-by-side checks on a shared machine: fastseg and its eager peer called alternately, call by
call, in one process, so that both see the same load (pytest-benchmark runs each case's rounds back
to back, and on the 2-core development VM a neighbour's burst can land on one side only), in an
order that rotates from round to round. Prints medians and the range of the per-round ratios.

    python benchmarks/interleaved.py unpool_conv --rounds 9
    python benchmarks/interleaved.py gcn --rounds 9        # also the CPU kernel's forced routes
    python benchmarks/interleaved.py gcn_training --rounds 7  # forward + backward
    python benchmarks/interleaved.py models --rounds 7     # fastseg.models (converted, layers only, reference) and fastseg.convert
    python benchmarks/interleaved.py atrous --rounds 7     # also the CPU kernel's forced paths, and ASPP
    python benchmarks/interleaved.py atrous --compile      # torch.compile as a peer too (unpool_conv, gcn, atrous)

Shapes are those of test_bench_unpool_conv.py, test_bench_gcn.py, test_bench_models.py and
test_bench_atrous.py.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from fastseg.benchmarking import compiled, warm_up

# --compile: torch.compile of the eager version as one more peer (compiled once per shape, before
# the rounds; fastseg.benchmarking.compiled makes a recompile-limit hit an error, not eager).
COMPILE = False

sys.path.insert(0, str(Path(__file__).resolve().parent))


def compare(name, fns, rounds, grad=False):
    """fns: {label: callable}, the first being fastseg's; prints each median and speed-up. Autograd
    records only with grad."""
    times = {label: [] for label in fns}
    with torch.enable_grad() if grad else torch.no_grad():
        for fn in fns.values():
            warm_up(fn)
        labels = list(fns)
        for r in range(rounds):
            # The order rotates from round to round: a call can pay for the one before it (caches,
            # freed memory), so no label always follows the same other one.
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                start = time.perf_counter()
                fns[label]()
                times[label].append(time.perf_counter() - start)
    ours, *peers = fns
    parts = [f"{ours} {statistics.median(times[ours]) * 1e3:.1f} ms"]
    for peer in peers:
        ratios = [p / o for o, p in zip(times[ours], times[peer])]
        parts.append(f"{peer} {statistics.median(times[peer]) * 1e3:.1f} ms "
                     f"({statistics.median(times[peer]) / statistics.median(times[ours]):.2f}x, "
                     f"rounds {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"{name}: " + ", ".join(parts), flush=True)


def unpool_conv(rounds):
    import test_bench_unpool_conv as bench

    for shape in bench.SEGNET_SHAPES:
        for layout in ("nchw", "channels_last"):
            t = bench._problem(shape, layout, "cpu", torch.float32)
            size = shape[2:]
            fns = {"fastseg": bench._fn(bench.FASTSEG, t, size, "cpu"),
                   "eager": bench._fn("torch eager", t, size, "cpu")}
            if COMPILE:
                fns["torch.compile"] = bench._fn("torch.compile", t, size, "cpu")
            compare(f"unpool_conv2d {'x'.join(map(str, shape))} {layout}", fns, rounds)


def _gcn_problems():
    """(name, x, [4 weights], [4 biases], generator) for test_bench_gcn.py's shapes in both layouts."""
    import test_bench_gcn as bench

    for B, Cin, H, Cm, Co, k in bench.GCN_SHAPES:
        for layout in ("nchw", "channels_last"):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, Cin, H, H, generator=g)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            make = lambda *s: torch.randn(*s, generator=g) / (s[1] * k) ** 0.5  # noqa: E731
            ws = [make(Cm, Cin, k, 1), make(Co, Cm, 1, k), make(Cm, Cin, 1, k), make(Co, Cm, k, 1)]
            bs = [torch.randn(n, generator=g) for n in (Cm, Co, Cm, Co)]
            yield f"{B}x{Cin}x{H}x{H} ->{Cm}->{Co} k{k} {layout}", x, ws, bs, g


def gcn(rounds):
    import test_bench_gcn as bench

    for name, x, ws, bs, _ in _gcn_problems():
        fns = {"fastseg": lambda: torch.ops.fastseg.gcn_conv2d(x, *ws, *bs, 1, "auto"),
               "eager": lambda: bench._four_convs(x, *ws, *bs)}
        if COMPILE:
            fns["torch.compile"] = (lambda peer: lambda: peer(x, *ws, *bs))(compiled(bench._four_convs, "cpu"))
        for route in ("gemm", "conv", "fft"):  # the C++ kernel's routes, forced
            fns[f"forced {route}"] = (lambda r: lambda: torch.ops.fastseg.gcn_conv2d(x, *ws, *bs, 1, r))(route)
        compare(f"gcn_conv2d {name}", fns, rounds)


def gcn_training(rounds):
    """Forward + backward of the GCN block, every input requiring grad, against eager autograd through
    the four convolutions; 'fastseg, ATen backward' is the backward the frequency-domain one replaced
    (ATen's convolution backward for all four convolutions)."""
    import test_bench_gcn as bench
    import fastseg
    import fastseg.ops.gcn as gcn_ops

    def aten_backward(step):
        def run():
            rule, gcn_ops._fft_backward_pays = gcn_ops._fft_backward_pays, lambda *args: False
            try:
                step()
            finally:
                gcn_ops._fft_backward_pays = rule
        return run

    for name, x, ws, bs, g in _gcn_problems():
        leaves = [t.requires_grad_() for t in [x, *ws, *bs]]
        grad = torch.randn(x.shape[0], ws[1].shape[0], *x.shape[2:], generator=g)

        def step(block):
            def run():
                for t in leaves:
                    t.grad = None
                block(*leaves).backward(grad)
            return run

        fastseg_step = step(fastseg.gcn_conv2d)
        fns = {"fastseg": fastseg_step, "eager": step(bench._four_convs),
               "fastseg, ATen backward": aten_backward(fastseg_step)}
        compare(f"gcn_conv2d training {name}", fns, rounds, grad=True)


def atrous(rounds):
    import fastseg
    import test_bench_atrous as bench

    for B, C, H, rate in bench.CONV_SHAPES:
        for layout in ("nchw", "channels_last"):
            g = torch.Generator().manual_seed(0)
            x = bench._layout(torch.randn(B, C, H, H, generator=g), layout)
            w = torch.randn(bench.OUT, C, 3, 3, generator=g) / (9 * C) ** 0.5
            mean, gamma, beta = (torch.randn(bench.OUT, generator=g) for _ in range(3))
            var = torch.rand(bench.OUT, generator=g) + 0.5
            scale = gamma * torch.rsqrt(var + 1e-5)
            shift = beta - mean * scale
            args = (x, w, scale, shift, None, [1, 1], [rate, rate], [rate, rate], 1, True)
            fns = {"fastseg": lambda: fastseg.atrous_conv2d(x, w, dilation=rate, padding=rate, scale=scale, shift=shift,
                                                            activation="relu"),
                   "eager": lambda: bench._conv_bn_relu(x, w, mean, var, gamma, beta, rate)}
            if COMPILE:
                peer = compiled(bench._conv_bn_relu, "cpu")
                fns["torch.compile"] = lambda: peer(x, w, mean, var, gamma, beta, rate)
            for path in ("winograd", "conv"):  # the C++ kernel's paths, forced
                fns[f"forced {path}"] = (lambda p: lambda: torch.ops.fastseg.atrous_conv2d(*args, p))(path)
            compare(f"atrous_conv2d {B}x{C}->{bench.OUT} {H}x{H} rate {rate} {layout}", fns, rounds)
    for version, rates in (("v2", (6, 12, 18, 24)), ("v3", (12, 24, 36))):
        torch.manual_seed(0)
        aspp = fastseg.nn.ASPP(2048, bench.OUT, version=version, rates=rates).eval()
        x = torch.randn(1, 2048, 65, 65).contiguous(memory_format=torch.channels_last)
        fns = {"fastseg": lambda: aspp(x), "eager": lambda: bench._plain_aspp(aspp, x)}
        if COMPILE:
            peer = compiled(bench._plain_aspp, "cpu")
            fns["torch.compile"] = lambda: peer(aspp, x)
        compare(f"ASPP {version} rates {rates} 1x2048->{bench.OUT} 65x65 channels_last", fns, rounds)


def models(rounds):
    import test_bench_models as bench
    from fastseg import models as zoo

    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    for name in zoo.list_models():
        model = bench._model(name, "cpu", False)
        converted = bench._converted(name, "cpu", False)

        def run(flag, model=model):
            model.set_use_kernels(flag)
            return model(x)["out"]

        compare(f"{name} 1x3x512x512", {"fastseg": lambda: converted(x)["out"], "layers only": lambda: run(True),
                                        "reference layers": lambda: run(False)}, rounds)
    for name in bench.ZOO:
        original, converted = bench._zoo_pair(name, "cpu")
        compare(f"convert {name} 1x3x512x512", {"fastseg": lambda: converted(x), "original": lambda: original(x)},
                rounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["unpool_conv", "gcn", "gcn_training", "models", "atrous"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile as a peer too")
    args = parser.parse_args()
    COMPILE = args.compile
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    globals()[args.what](args.rounds)

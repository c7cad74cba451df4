"""The dead-tap cut of atrous_conv2d and gcn_conv2d (taps a large rate puts past the map at every
output are left out) measured on the CPU: fastseg with the cut, fastseg with it patched out in the
same process, and eager PyTorch; medians of 7 calls after a warm-up.

    python benchmarks/dead_taps.py
"""
import statistics
import time

import torch

import fastseg
from fastseg.ops import atrous as A
from fastseg.ops import gcn as G

cut_a, cut_g = A.without_dead_taps, G._without_dead_taps


def no_cut_a(w, hw, out_hw, stride, padding, dilation):
    return w, padding, dilation


def no_cut_g(*args):
    return args[:5]



def median_ms(f, n=7):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def gcn_step(x, ws, d, backend):
    y = fastseg.gcn_conv2d(x, *ws, dilation=d, backend=backend)
    y.sum().backward()


torch.manual_seed(0)
for B, C, H, k, d in [(1, 64, 16, 15, 500), (1, 64, 16, 15, 4), (2, 256, 33, 15, 12), (1, 512, 32, 15, 8)]:
    x = torch.randn(B, C, H, H, requires_grad=True)
    shapes = [(21, C, k, 1), (21, 21, 1, k), (21, C, 1, k), (21, 21, k, 1)]
    ws = [torch.randn(*shape, requires_grad=True) for shape in shapes]
    G._without_dead_taps = cut_g
    cut = median_ms(lambda: gcn_step(x, ws, d, "cpp"))
    G._without_dead_taps = no_cut_g
    before = median_ms(lambda: gcn_step(x, ws, d, "cpp"))
    eager = median_ms(lambda: gcn_step(x, ws, d, "reference"))
    G._without_dead_taps = cut_g
    print(f"gcn_conv2d fwd+bwd {B}x{C}->21 {H}x{H} k={k} d={d}: "
          f"cut {cut:.1f} ms, uncut {before:.1f} ms, eager {eager:.1f} ms")

with torch.no_grad():
    cases = [(1, 256, 33, 36, False), (1, 256, 33, 36, True), (1, 2048, 33, 36, False), (8, 256, 33, 36, True)]
    for B, C, H, d, cl in cases:
        x = torch.randn(B, C, H, H)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        w, s, sh = torch.randn(256, C, 3, 3), torch.rand(256), torch.randn(256)
        f = lambda b: fastseg.atrous_conv2d(x, w, dilation=d, scale=s, shift=sh, activation="relu", backend=b)  # noqa: E731
        A.without_dead_taps = cut_a
        cut = median_ms(lambda: f("cpp"))
        A.without_dead_taps = no_cut_a
        before = median_ms(lambda: f("cpp"))
        A.without_dead_taps = cut_a
        conv = lambda: torch.nn.functional.conv2d(x, w, padding=d, dilation=d)  # noqa: E731
        eager = median_ms(lambda: torch.relu(conv() * s.view(-1, 1, 1) + sh.view(-1, 1, 1)))
        layout = "channels_last" if cl else "nchw"
        print(f"atrous_conv2d {B}x{C}->256 {H}x{H} rate {d} {layout}: "
              f"cut {cut:.2f} ms, uncut {before:.2f} ms, eager {eager:.2f} ms")

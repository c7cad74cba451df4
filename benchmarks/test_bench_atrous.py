"""atrous_conv2d (conv + folded BatchNorm + ReLU) and ASPP against eager PyTorch and torch.compile.

DeepLab shapes (Chen et al., TPAMI 2017 and 2017): a 513x513 input at output stride 16 or 8 gives
33x33 or 65x65 maps (129x129 at stride 4); 256 output channels from the backbone's 256..2048;
rates 2..36. A representative subset keeps the CPU run to a few minutes. FLOPs are the nominal
2 * B * Ho * Wo * O * C / groups * kH * kW, padded taps included, so GFLOP/s are comparable
across rates.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastseg
from conftest import DEVICES, FASTSEG, shapes
from fastseg.benchmarking import compiled, dtypes

# (B, C, H, rate): 256-channel ASPP branches at the v3 rates on 65x65 and 33x33 (rate 36 at 33x33:
# v3's degenerate case, only the centre tap touches the map), a wide backbone input at a ResNet
# stage's rate 2, a batch of 8, and a 129x129 map at rate 6.
CONV_SHAPES = shapes(
    [(1, 256, 65, 12), (1, 256, 65, 36), (1, 512, 33, 18), (1, 256, 33, 36), (1, 2048, 33, 2), (8, 256, 33, 24),
     (1, 256, 129, 6)],
    [(1, 8, 9, 2), (2, 4, 7, 6)],
)
ASPP_SHAPES = shapes([(1, 2048, 65)], [(1, 16, 9)])
CASES = [(device, dtype) for device in DEVICES for dtype in dtypes(device)]
IMPLS = [FASTSEG, "torch eager", "torch.compile"]
OUT = 256


def _conv_bn_relu(x, w, mean, var, gamma, beta, rate):
    return F.relu(F.batch_norm(F.conv2d(x, w, None, 1, rate, rate), mean, var, gamma, beta, False, 0.0, 1e-5))


@functools.lru_cache(maxsize=None)
def _peer(impl, device, fn):
    return fn if impl == "torch eager" else compiled(fn, device)


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "B{}-C{}-{}x{}-rate{}".format(s[0], s[1], s[2], s[2], s[3]))
@pytest.mark.parametrize("device,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_atrous_conv_bn_relu(bench, device, dtype, shape, layout, impl):
    B, C, H, rate = shape
    out_channels = OUT if C >= 64 else C
    gen = torch.Generator().manual_seed(0)
    x = _layout(torch.randn(B, C, H, H, generator=gen), layout).to(device, dtype)
    w = (torch.randn(out_channels, C, 3, 3, generator=gen) / (9 * C) ** 0.5).to(device, dtype)
    mean, gamma, beta = (torch.randn(out_channels, generator=gen).to(device, dtype) for _ in range(3))
    var = (torch.rand(out_channels, generator=gen) + 0.5).to(device, dtype)
    if impl == FASTSEG:
        scale = gamma * torch.rsqrt(var + 1e-5)
        shift = beta - mean * scale
        fn = lambda: fastseg.atrous_conv2d(x, w, dilation=rate, padding=rate, scale=scale, shift=shift, activation="relu")
    else:
        peer = _peer(impl, device, _conv_bn_relu)
        fn = lambda: peer(x, w, mean, var, gamma, beta, rate)
    name = "B{} C{}->{} {}x{} rate {} {} {}".format(B, C, out_channels, H, H, rate, layout, str(dtype).replace("torch.", ""))
    with torch.no_grad():
        out = bench(f"atrous conv+BN+ReLU {name} {device}", impl, fn, device=device,
                    flops=2 * B * H * H * out_channels * C * 9)
    assert out.shape == (B, out_channels, H, H)


def _plain_aspp(aspp, x):
    """The same ASPP, eval mode, in eager PyTorch: conv, batch_norm and relu per branch."""
    def cbr(layer, t):
        c, bn = layer.conv, layer.bn
        y = F.conv2d(t, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))

    if aspp.version == "v2":
        return sum(F.conv2d(x, c.weight, c.bias, 1, c.padding, c.dilation) for c in aspp.branches)
    outs = [cbr(b, x) for b in aspp.branches]
    outs.append(cbr(aspp.pooling, x.mean((2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:]))
    return cbr(aspp.project, torch.cat(outs, 1))


def _aspp_flops(aspp, B, C, H):
    convs = [m for m in aspp.modules() if isinstance(m, torch.nn.Conv2d)]
    flops = 0
    for c in convs:
        pixels = 1 if (hasattr(aspp, "pooling") and c is aspp.pooling.conv) else H * H
        flops += 2 * B * pixels * c.out_channels * c.in_channels * c.kernel_size[0] * c.kernel_size[1]
    return flops


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("version,rates", [("v2", (6, 12, 18, 24)), ("v3", (12, 24, 36))], ids=["v2", "v3-os8"])
@pytest.mark.parametrize("shape", ASPP_SHAPES, ids=lambda s: "B{}-C{}-{}x{}".format(s[0], s[1], s[2], s[2]))
@pytest.mark.parametrize("device,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_aspp(bench, device, dtype, shape, version, rates, impl):
    B, C, H = shape
    out_channels = OUT if C >= 64 else 8
    torch.manual_seed(0)
    aspp = fastseg.nn.ASPP(C, out_channels, version=version, rates=rates).eval().to(device, dtype)
    x = _layout(torch.randn(B, C, H, H), "channels_last").to(device, dtype)
    if impl == FASTSEG:
        fn = lambda: aspp(x)
    else:
        peer = _peer(impl, device, _plain_aspp)
        fn = lambda: peer(aspp, x)
    with torch.no_grad():
        out = bench(f"ASPP {version} rates {rates} B{B} C{C}->{out_channels} {H}x{H} channels_last "
                    f"{str(dtype).replace('torch.', '')} {device}", impl, fn, device=device,
                    flops=_aspp_flops(aspp, B, C, H))
    assert out.shape == (B, out_channels, H, H)

"""kernels/taps_conv.py, the GPU "taps" route (one GEMM over the channels, a Triton shift-and-add
over the taps), against plain convolutions in float64: DeepLab v2's sum of branches, v3's
concatenated BN + ReLU branches, and the direct (dispatcher-free) call of the Python custom ops.
Triton runs on CUDA tensors, or on CPU tensors under the interpreter (tests/conftest.py)."""
import pytest
import torch
import torch.nn.functional as F

import fastseg
from common import assert_relative_close

taps_conv = pytest.importorskip("fastseg.kernels.taps_conv")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not fastseg._backends.TRITON_INTERPRETED,
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
# Triton's device: the GPU, else CPU tensors under the interpreter.
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float64] + ([torch.float16] if torch.cuda.is_available() else [])


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# (B, C, O, H, W, rates): rates past the map (only the centre tap meets it), equal offsets merged
# across branches, 21 outputs (blocks padded to 24 columns), a 1-row map.
SUM_CASES = [(2, 5, 3, 9, 7, (1, 2, 6)), (1, 4, 21, 13, 13, (6, 12, 18, 24)), (2, 3, 2, 5, 5, (6,)),
             (1, 6, 9, 1, 11, (1, 3))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SUM_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-r{c[5]}")
def test_conv_sum(case, dtype, channels_last, device, poison):
    B, C, O, H, W, rates = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    ws = [torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64) / (3 * C ** 0.5) for _ in rates]
    bias = torch.randn(O, generator=gen, dtype=torch.float64)
    cast = lambda t: t.to(device=device, dtype=dtype)
    xc = _layout(cast(x), channels_last)
    out = taps_conv.conv_sum(xc, [cast(w) for w in ws], [(r, r) for r in rates], cast(bias))
    rounded = lambda t: t.to(dtype).double()
    expected = sum(F.conv2d(rounded(x), rounded(w), None, 1, r, r) for w, r in zip(ws, rates))
    expected = expected + rounded(bias).view(1, -1, 1, 1)
    assert out.shape == expected.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_relative_close(out.cpu(), expected, dtype)
    # The same result from a kept pack; a pack for another map size is not reused.
    packed = taps_conv.pack_sum([cast(w) for w in ws], [(r, r) for r in rates], cast(bias), (H, W))
    again = taps_conv.conv_sum(xc, [cast(w) for w in ws], [(r, r) for r in rates], packed=packed)
    assert torch.equal(again, out)
    other = taps_conv.pack_sum([cast(w) for w in ws], [(r, r) for r in rates], cast(bias), (H + 1, W))
    assert torch.equal(taps_conv.conv_sum(xc, [cast(w) for w in ws], [(r, r) for r in rates], cast(bias),
                                          packed=other), out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,W,rates", [(9, 9, (1, 12)), (7, 10, (2, 3, 4)), (6, 5, (12, 24, 36))])
def test_parallel_conv_bn_relu(H, W, rates, dtype, channels_last, device, poison):
    # A 1x1 branch and 3x3 branches: branches with fewer taps meeting the map than others (rate 12
    # on 9x9: the centre only) pad their rows of the tap table.
    gen = torch.Generator().manual_seed(2)
    B, C, O = 2, 6, 5
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    ws = [torch.randn(O, C, 1, 1, generator=gen, dtype=torch.float64)]
    ws += [torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64) / 3 for _ in rates]
    dil = [(1, 1)] + [(r, r) for r in rates]
    scales = [torch.rand(O, generator=gen, dtype=torch.float64) + 0.5 for _ in ws]
    shifts = [torch.randn(O, generator=gen, dtype=torch.float64) for _ in ws]
    cast = lambda t: t.to(device=device, dtype=dtype)
    out = taps_conv.parallel_conv_bn_relu(_layout(cast(x), channels_last), [cast(w) for w in ws], dil,
                                          [cast(s) for s in scales], [cast(s) for s in shifts])
    rounded = lambda t: t.to(dtype).double()
    expected = torch.cat([
        F.relu(F.conv2d(rounded(x), rounded(w), None, 1, d[0] * (w.shape[-1] // 2), d) * rounded(s).view(1, -1, 1, 1)
               + rounded(t).view(1, -1, 1, 1))
        for w, d, s, t in zip(ws, dil, scales, shifts)], 1)
    assert out.shape == (B, len(ws) * O, H, W) and out.is_contiguous(memory_format=torch.channels_last)
    # float16/bfloat16 also round each branch's scale into its weights (one rounding more).
    assert_relative_close(out.cpu(), expected, dtype)


def test_direct_call_equals_the_custom_op():
    # _backends.call skips the dispatcher only where it adds nothing: the same numbers either way,
    # and autograd goes through the op when it records.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, 7, generator=gen).to(device)
    ws = [torch.randn(*s, generator=gen).to(device) for s in ((3, 5, 5, 1), (4, 3, 1, 5), (3, 5, 1, 5), (4, 3, 5, 1))]
    with torch.no_grad():
        direct = fastseg.gcn_conv2d(x, *ws, backend="triton")
    through_op = torch.ops.fastseg.gcn_conv2d_triton(x, *ws, None, None, None, None, 1)
    assert torch.equal(direct, through_op)
    leaf = x.clone().requires_grad_()
    out = fastseg.gcn_conv2d(leaf, *ws, backend="triton")
    assert out.grad_fn is not None
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()

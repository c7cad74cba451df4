import pytest
import torch

import fastseg
from fastseg._checks import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 1, 12345, -1])
def test_all_finite_finds_every_nonfinite_value(dtype, bad, where):
    x = torch.randn(3, 21, 37, 53).to(dtype)
    assert all_finite(x)
    x.view(-1)[where] = bad
    assert not all_finite(x)
    assert not all_finite(x.transpose(1, 3))  # strided input too


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0, 3))
    assert all_finite(torch.randint(0, 255, (3, 4), dtype=torch.uint8))
    assert all_finite(torch.tensor(1e38).expand(100))  # large but finite (a sum would overflow)
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.complex64))


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_forward_mode_ad_is_refused():
    # A custom op without a forward-AD rule gets a zero (torch.func.jvp) or no (forward_ad) tangent
    # from PyTorch, silently: fastseg's ops raise instead; reverse mode is unaffected.
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from torch.func import jvp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, generator=g)
    values, indices = F.max_pool2d(x, 2, return_indices=True)
    w = torch.randn(4, 3, 3, 3, generator=g)
    calls = [
        (x, lambda a: fastseg.atrous_conv2d(a, w, padding=1)),
        (values, lambda a: fastseg.max_unpool2d(a, indices, 2)),
        (values, lambda a: fastseg.unpool_conv2d(a, indices, w, kernel_size=2)),
        (x, lambda a: fastseg.gcn_conv2d(a, w[:2, :, :, :1], w[:, :2, :1], w[:2, :, :1], w[:, :2, :, :1])),
        (x, lambda a: fastseg.dense_crf(a, iterations=1, bilateral=None)),
    ]
    for arg, fn in calls:
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            jvp(fn, (arg,), (torch.ones_like(arg),))
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
            fn(fwAD.make_dual(arg, torch.ones_like(arg)))
        leaf = arg.clone().requires_grad_()
        fn(leaf).sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()

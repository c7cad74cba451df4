"""kernels/dense_crf.py: the Triton splat / blur / slice of the permutohedral lattice (the start of
the dense CRF's GPU path, issue 4) against the plain-PyTorch reference in float64, forward and
exact transpose, every normalisation. On the CPU they run under TRITON_INTERPRET=1: tiny shapes."""
import pytest
import torch

from common import DEVICES, relative_error
from fastseg import _backends
from fastseg.ops._reference import dense_crf as R


def _device_params():
    params = []
    for device in DEVICES:
        reason = _backends.unavailable_reason("triton", device)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if device == "cpu":
            marks.append(pytest.mark.triton_interpreter)
        params.append(pytest.param(device, id=device, marks=marks))
    return params


def _features(kind, H=6, W=7, seed=0):
    """Tiny (N, D) features: the gaussian kernel's positions or the bilateral kernel's (x, y, rgb)
    of a blocky noisy image, already divided by the standard deviations."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    position = torch.stack([x.reshape(-1), y.reshape(-1)], 1)
    if kind == "gaussian":
        return position / 1.5
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (3, 2, 2), generator=g).float()
    rgb = torch.nn.functional.interpolate(rgb[None], size=(H, W), mode="nearest")[0].reshape(3, -1).t()
    rgb = rgb + 10 * torch.randn(rgb.shape, generator=g)
    return torch.cat([position / 3.0, rgb / 30.0], 1)


def _poison_on_cpu(device, request):
    # The poison fixture turns on deterministic mode, which some CUDA ops of the reference's
    # lattice build (index_add_, scatter_add_) may refuse; on the CPU it checks every output write.
    if device == "cpu":
        request.getfixturevalue("poison")


@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("normalization", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["gaussian", "bilateral"])
def test_filter_matches_reference(kind, normalization, transpose, device, request):
    from fastseg.kernels import dense_crf as kernels

    _poison_on_cpu(device, request)
    f = _features(kind)
    values = torch.rand(f.shape[0], 3, generator=torch.Generator().manual_seed(1))
    out = kernels.filter_lattice(values.to(device), f.to(device), normalization, transpose=transpose)
    ref = R.filter_lattice(values.double(), f, normalization, transpose=transpose)
    assert out.dtype == torch.float32 and out.device.type == device
    assert relative_error(out.cpu(), ref) <= 1e-5


@pytest.mark.parametrize("device", _device_params())
def test_raw_filter_many_channels_and_adjoint(device, request):
    # 70 channels: two channel blocks of 64; <F(x), y> == <x, F^T(y)> on the same lattice.
    from fastseg.kernels import dense_crf as kernels

    _poison_on_cpu(device, request)
    f = _features("bilateral", H=5, W=4, seed=2)
    lattice = R.PermutohedralLattice(f)  # the reference, on the CPU
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(f.shape[0], 70, generator=g), torch.randn(f.shape[0], 70, generator=g)
    on_device = R.PermutohedralLattice(f.to(device))  # the sort/unique build, on the device
    fx = kernels.lattice_filter(x.to(device), on_device).cpu()
    fty = kernels.lattice_filter(y.to(device), on_device, transpose=True).cpu()
    assert relative_error(fx, lattice.filter(x.double())) <= 1e-5
    assert relative_error(fty, lattice.filter(y.double(), transpose=True)) <= 1e-5
    lhs, rhs = (fx.double() * y.double()).sum(), (x.double() * fty.double()).sum()
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)

"""kernels/dense_crf.py: the Triton splat / blur / slice of the permutohedral lattice (the dense
CRF's GPU path, issue 4) against the plain-PyTorch reference in float64, forward and exact
transpose, every normalisation; and the 'triton' backend of fastseg.dense_crf and
fastseg.permutohedral_filter (batched lattices, mean field, backward) against the reference and the
C++ path. On the CPU they run under TRITON_INTERPRET=1: tiny shapes."""
import sys

import pytest
import torch

import fastseg
import fastseg.ops.dense_crf  # noqa: F401  (the module; fastseg.ops.dense_crf is the function)
from common import DEVICES, relative_error
from fastseg import _backends
from fastseg.ops._reference import dense_crf as R

crf_ops = sys.modules["fastseg.ops.dense_crf"]


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


# --- the 'triton' backend of fastseg.dense_crf -----------------------------------------------------


def _crf_inputs(B, L, H, W, seed):
    """Smooth-ish random scores and blocky noisy uint8 images, a different one per batch entry."""
    g = torch.Generator().manual_seed(seed)
    coarse = 2 * torch.randn(B, L, 2, 2, generator=g)
    scores = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    scores = scores + 0.5 * torch.randn(scores.shape, generator=g)
    blocks = torch.randint(0, 256, (B, 3, 2, 2), generator=g).float()
    image = torch.nn.functional.interpolate(blocks, size=(H, W), mode="nearest")
    image = (image + 10 * torch.randn(image.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return scores, image


KERNELS = {
    "both": (dict(sxy=1.5, compat=3), dict(sxy=3, srgb=20, compat=5)),
    "gaussian-only": (dict(sxy=1.5, compat=3), None),
    "bilateral-only": (None, dict(sxy=3, srgb=20, compat=5)),
}
NAMES = ("none", "before", "after", "symmetric")
needs_cpp = pytest.mark.skipif(_backends.unavailable_reason("cpp", "cpu") is not None,
                               reason=str(_backends.unavailable_reason("cpp", "cpu")))


def _kernels(kind, normalization):
    gaussian, bilateral = KERNELS[kind]
    with_norm = [dict(k, normalization=normalization) if k is not None else None for k in (gaussian, bilateral)]
    return dict(gaussian=with_norm[0], bilateral=with_norm[1])


@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("normalization", NAMES)
@pytest.mark.parametrize("kind", list(KERNELS))
def test_dense_crf_matches_reference(kind, normalization, device, request):
    # B=2 different images; L=5 is not a multiple of the label block (8).
    _poison_on_cpu(device, request)
    scores, image = _crf_inputs(2, 5, 6, 7, seed=3)
    kw = dict(iterations=3, **_kernels(kind, normalization))
    q = fastseg.dense_crf(scores.to(device), image.to(device), backend="triton", **kw)
    ref = fastseg.dense_crf(scores.double(), image, backend="reference", **kw)
    assert q.dtype == torch.float32 and q.device.type == device and q.shape == scores.shape
    assert relative_error(q.cpu(), ref) <= 1e-5
    assert torch.equal(q.cpu().argmax(1), ref.argmax(1))


@pytest.mark.parametrize("device", _device_params())
def test_dense_crf_many_labels(device, request):
    # 70 labels: two label blocks of 64, the second one partial.
    _poison_on_cpu(device, request)
    scores, image = _crf_inputs(2, 70, 5, 4, seed=4)
    q = fastseg.dense_crf(scores.to(device), image.to(device), iterations=2, backend="triton").cpu()
    ref = fastseg.dense_crf(scores.double(), image, iterations=2, backend="reference")
    assert relative_error(q, ref) <= 1e-5
    assert torch.equal(q.argmax(1), ref.argmax(1))


@needs_cpp
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("unary", crf_ops.UNARIES)
def test_dense_crf_matches_cpp(unary, device, request):
    # Every unary mode, 21 labels (a block of 32), unbatched too.
    _poison_on_cpu(device, request)
    scores, image = _crf_inputs(2, 21, 5, 4, seed=4)
    if unary == "probs":
        scores = torch.softmax(scores, 1)
    kw = dict(iterations=2, unary=unary)
    q = fastseg.dense_crf(scores.to(device), image.to(device), backend="triton", **kw).cpu()
    cpp = fastseg.dense_crf(scores, image, backend="cpp", **kw)
    ref = fastseg.dense_crf(scores.double(), image, backend="reference", **kw)
    assert relative_error(q, ref) <= 1e-5 and relative_error(cpp, ref) <= 1e-5
    assert torch.equal(q.argmax(1), cpp.argmax(1))
    one = fastseg.dense_crf(scores[1].to(device), image[1].to(device), backend="triton", **kw).cpu()
    assert relative_error(one, ref[1]) <= 1e-5


@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("channels", [4, 1])
@pytest.mark.parametrize("shared", [False, True], ids=["per-image", "shared-features"])
@pytest.mark.parametrize("transpose", [False, True])
def test_permutohedral_filter_batch(transpose, shared, channels, device, request):
    # The batch's lattices concatenated: each image filtered on its own lattice; features of batch
    # 1 serve every image. One channel: (N, 1) rows whose strides are (1, N).
    _poison_on_cpu(device, request)
    _, image = _crf_inputs(3, 2, 5, 6, seed=5)
    features = crf_ops.bilateral_features(image, 2.0, 2.0, [30.0] * 3)
    if shared:
        features = features[:1]
    values = torch.rand(3, channels, 5, 6, generator=torch.Generator().manual_seed(5))
    out = crf_ops.permutohedral_filter(values.to(device), features.to(device), "before", transpose=transpose,
                                       backend="triton").cpu()
    ref = crf_ops.permutohedral_filter(values.double(), features, "before", transpose=transpose,
                                       backend="reference")
    assert out.dtype == torch.float32 and out.shape == values.shape
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("device", _device_params())
def test_permutohedral_filter_gradient(device, request):
    # d/dv <w, F(v)> = F^T(w): the triton op's backward is its transpose.
    _, image = _crf_inputs(2, 2, 4, 5, seed=6)
    features = crf_ops.bilateral_features(image, 2.0, 2.0, [30.0] * 3)
    values = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(6))
    w = torch.randn(values.shape, generator=torch.Generator().manual_seed(7))
    grads = []
    for backend, dtype, dev in (("triton", torch.float32, device), ("reference", torch.float64, "cpu")):
        v = values.to(dev, dtype).clone().requires_grad_()
        (crf_ops.permutohedral_filter(v, features.to(dev), "after", backend=backend) * w.to(dev, dtype)).sum().backward()
        grads.append(v.grad.cpu())
    assert relative_error(*grads) <= 1e-5


def _gradients(backend, device, dtype, scores, image, checkpoint, unary, normalization):
    """Gradients of <w, Q> for the scores, a full compat matrix and a learnable Potts weight."""
    L = scores.shape[1]
    g = torch.Generator().manual_seed(8)
    w = torch.randn(scores.shape, generator=g)
    compat = torch.randn(L, L, generator=g)
    s = scores.to(device, dtype).clone().requires_grad_()
    c = compat.to(device, dtype).clone().requires_grad_()
    potts = torch.tensor(3.0, dtype=dtype, device=device, requires_grad=True)
    q = fastseg.dense_crf(s, image.to(device), iterations=3, unary=unary, checkpoint=checkpoint, backend=backend,
                          gaussian=dict(sxy=1.5, compat=potts, normalization=normalization),
                          bilateral=dict(sxy=3, srgb=20, compat=c, normalization=normalization))
    (q * w.to(device, q.dtype)).sum().backward()
    return [t.grad.cpu() for t in (s, c, potts)]


@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("unary,checkpoint,normalization", [
    ("logits", False, "symmetric"), ("logits", True, "symmetric"), ("energy", False, "before"),
    ("probs", True, "after"), ("logits", False, "none"),
], ids=lambda v: str(v))
def test_gradients_match_reference(unary, checkpoint, normalization, device, request):
    _poison_on_cpu(device, request)
    scores, image = _crf_inputs(2, 5, 5, 6, seed=9)
    if unary == "probs":
        scores = torch.softmax(scores, 1)
    got = _gradients("triton", device, torch.float32, scores, image, checkpoint, unary, normalization)
    ref = _gradients("reference", "cpu", torch.float64, scores, image, checkpoint, unary, normalization)
    for name, a, b in zip(("scores", "compat", "potts"), got, ref):
        assert a.dtype == torch.float32
        assert relative_error(a, b) <= 1e-5, name


@pytest.mark.parametrize("device", _device_params())
def test_gradients_of_init_and_zero_iterations(device, request):
    # mean_field's init gets its gradient; with no iteration Q is init itself (a copy, not an alias).
    _poison_on_cpu(device, request)
    scores, image = _crf_inputs(1, 3, 4, 5, seed=10)
    features = [crf_ops.bilateral_features(image, 3.0, 3.0, [20.0] * 3)]
    w = torch.randn(scores.shape, generator=torch.Generator().manual_seed(10))
    for iterations in (0, 2):
        grads = []
        for impl, dtype, dev in (("triton", torch.float32, device), ("reference", torch.float64, "cpu")):
            init = torch.softmax(scores, 1).to(dev, dtype).clone().requires_grad_()
            U = scores.to(dev, dtype).clone().requires_grad_()
            C = [torch.randn(3, 3, generator=torch.Generator().manual_seed(11)).to(dev, dtype)]
            q = crf_ops.mean_field(U, [f.to(dev) for f in features], C, [3], iterations, init, impl=impl)
            (q * w.to(dev, q.dtype)).sum().backward()
            grads.append((init.grad.cpu(), U.grad.cpu()))
        assert relative_error(grads[0][0], grads[1][0]) <= 1e-5
        assert relative_error(grads[0][1], grads[1][1]) <= 1e-5  # zero for both with no iteration


def _opcheck_cases():
    scores, image = _crf_inputs(2, 3, 4, 5, seed=12)
    g = crf_ops.position_features(4, 5, 1.5, 1.5).unsqueeze(0)
    b = crf_ops.bilateral_features(image, 3.0, 3.0, [20.0] * 3)
    C = [(-3 * torch.eye(3)).requires_grad_(), torch.randn(3, 3, requires_grad=True)]
    U = scores.clone().requires_grad_()
    q0 = torch.softmax(scores, 1).requires_grad_()
    return {
        "dense_crf_triton": ("dense_crf_triton", (U, [g, b], C, [3, 1], 2, None, -1.0)),
        "dense_crf_triton-init": ("dense_crf_triton", (U, [b], C[1:], [2], 1, q0, 1.0)),
        "dense_crf_iterates-triton": ("dense_crf_iterates", (U, [g, b], C, [3, 0], 2, None, -1.0, "triton")),
        "permutohedral_filter_triton": ("permutohedral_filter_triton",
                                        (torch.rand(2, 3, 4, 5, requires_grad=True), b, 2, True)),
    }


@pytest.mark.slow
@pytest.mark.triton_interpreter
@pytest.mark.skipif(_backends.unavailable_reason("triton", "cpu") is not None,
                    reason=str(_backends.unavailable_reason("triton", "cpu")))
@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.fastseg, name).default, args)


def test_auto_picks_triton_on_cuda():
    # Selection only (no CUDA tensor is made): with no compiled CUDA dense CRF, auto is triton.
    if _backends.TRITON_INSTALLED:
        assert _backends.select("dense_crf", "auto", torch.device("cuda"), crf_ops._IMPLEMENTED) == "triton"
    assert _backends.select("dense_crf", "auto", torch.device("cpu"), crf_ops._IMPLEMENTED) in ("cpp", "reference")


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backends, "TRITON_INTERPRETED", False)
    scores, image = _crf_inputs(1, 3, 4, 5, seed=13)
    with pytest.raises(RuntimeError, match="dense_crf: backend 'triton' is unavailable for cpu tensors"):
        fastseg.dense_crf(scores, image, backend="triton")
    with pytest.raises(RuntimeError, match="permutohedral_filter: backend 'triton' is unavailable"):
        crf_ops.permutohedral_filter(scores, scores[:, :2], backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: scores and image on different devices")
def test_image_on_another_device():
    scores, image = _crf_inputs(1, 3, 4, 5, seed=14)
    with pytest.raises(ValueError, match="scores is on cuda:0 but image is on cpu"):
        fastseg.dense_crf(scores.cuda(), image, backend="triton")


@pytest.mark.parametrize("device", _device_params())
def test_no_kernel_is_softmax(device, request):
    # With both kernels off mean field never moves: Q = softmax(scores) for logits.
    _poison_on_cpu(device, request)
    scores = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(16))
    q = fastseg.dense_crf(scores.to(device), None, gaussian=None, bilateral=None, iterations=2, backend="triton")
    assert relative_error(q.cpu(), torch.softmax(scores.double(), 1)) <= 1e-6

"""fastseg.dense_crf: parity with pydensecrf2 (the reference densecrf), the C++ kernel against the
plain-PyTorch lattice reference, the lattice against the exact O(N^2) CRF, the custom ops, the
layer, the pydensecrf shim, and every bad input."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastseg
import fastseg.crf
import fastseg.ops.dense_crf  # noqa: F401  (the module; fastseg.ops.dense_crf is the function)
from common import backend_params
from fastseg.ops._reference import dense_crf as R

crf_ops = sys.modules["fastseg.ops.dense_crf"]
BACKENDS = backend_params(implemented=("reference", "cpp"))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crf"
GAUSSIAN = dict(sxy=3, compat=3)
BILATERAL = dict(sxy=80, srgb=13, compat=10)


def _pydensecrf():
    return pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is not installed (pip install pydensecrf2)")


def _smooth_logits(L, H, W, seed, scale=3.0, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (L, max(H // 8, 2), max(W // 8, 2)) if batch is None else (batch, L, max(H // 8, 2), max(W // 8, 2))
    coarse = torch.randn(shape, generator=g) * scale
    x = coarse if batch is not None else coarse.unsqueeze(0)
    x = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    x = x + 0.5 * torch.randn(x.shape, generator=g)
    return x if batch is not None else x[0]


def _random_image(H, W, seed, C=3):
    """Piecewise-constant colour blobs with noise: an image with edges for the bilateral kernel."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (1, C, max(H // 10, 2), max(W // 10, 2)), generator=g).float()
    img = torch.nn.functional.interpolate(coarse, size=(H, W), mode="nearest")[0]
    img = img + 12 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 255).to(torch.uint8)


def _pydensecrf_q(unary, image, iterations, gaussian=GAUSSIAN, bilateral=BILATERAL):
    """pydensecrf2's Q (L, H, W) for unary energies (L, H, W) and an image (C, H, W) uint8."""
    dcrf = _pydensecrf()
    L, H, W = unary.shape
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(L, -1).numpy(), dtype=np.float32))
    if gaussian is not None:
        d.addPairwiseGaussian(sxy=gaussian["sxy"], compat=gaussian["compat"])
    if bilateral is not None:
        rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        d.addPairwiseBilateral(sxy=bilateral["sxy"], srgb=bilateral["srgb"], rgbim=rgb, compat=bilateral["compat"])
    return torch.from_numpy(np.array(d.inference(iterations), dtype=np.float32)).reshape(L, H, W)


def _assert_parity(q, ref, *, agree=0.995, mean_abs=1e-3):
    assert q.shape == ref.shape
    agreement = (q.argmax(0) == ref.argmax(0)).double().mean().item()
    diff = (q - ref).abs().mean().item()
    assert agreement >= agree, f"argmax agrees on {agreement:.4%} of pixels (< {agree:.1%})"
    assert diff <= mean_abs, f"mean |dQ| = {diff:.3g} > {mean_abs:.3g}"


def _load_example(n):
    from PIL import Image

    if not DATA.is_dir():
        pytest.skip(f"dense-CRF example data not found at {DATA}")
    image = np.array(Image.open(DATA / f"im{n}.png").convert("RGB"))
    anno = np.array(Image.open(DATA / f"anno{n}.png").convert("RGB")).astype(np.int64)
    flat = anno[..., 0] << 16 | anno[..., 1] << 8 | anno[..., 2]
    colours, labels = np.unique(flat, return_inverse=True)
    unknown = colours[0] == 0  # black: unknown, label 0 after sorting
    n_labels = len(colours) - int(unknown)
    if not unknown:
        labels = labels + 1
    unary = fastseg.crf.unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=True)
    H, W = image.shape[:2]
    return (torch.from_numpy(unary).reshape(n_labels, H, W), torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            colours[int(unknown):], anno)


# --- parity with pydensecrf2 ---------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [5, 10])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_parity_pydensecrf_real_images(n, iterations):
    unary, image, _, _ = _load_example(n)
    ref = _pydensecrf_q(unary, image, iterations)
    q = fastseg.dense_crf(unary, image, iterations=iterations, unary="energy")
    _assert_parity(q, ref)


def test_real_image_matches_stored_output():
    # outN.png came from an older densecrf build: a sanity check only (the fresh run is the oracle).
    from PIL import Image

    unary, image, colours, _ = _load_example(1)
    q = fastseg.dense_crf(unary, image, iterations=5, unary="energy")
    out = np.array(Image.open(DATA / "out1.png").convert("RGB")).astype(np.int64)
    expected = out[..., 0] << 16 | out[..., 1] << 8 | out[..., 2]
    ours = colours[q.argmax(0).numpy()]
    assert (ours == expected).mean() >= 0.95


@pytest.mark.parametrize("iterations", [5, 10])
@pytest.mark.parametrize("kernels", ["both", "gaussian", "bilateral"])
@pytest.mark.parametrize("size", [(48, 64, 5), (61, 47, 21)], ids=lambda s: "x".join(map(str, s)))
def test_parity_pydensecrf_random(size, kernels, iterations):
    H, W, L = size
    logits = _smooth_logits(L, H, W, seed=H + L)
    image = _random_image(H, W, seed=W)
    gaussian = GAUSSIAN if kernels in ("both", "gaussian") else None
    bilateral = BILATERAL if kernels in ("both", "bilateral") else None
    unary = -torch.log_softmax(logits, 0)
    ref = _pydensecrf_q(unary, image, iterations, gaussian, bilateral)
    q = fastseg.dense_crf(logits, image, iterations=iterations, gaussian=gaussian, bilateral=bilateral)
    _assert_parity(q, ref)


def test_parity_pydensecrf_voc_kernels():
    # DeepLab-v2's VOC settings: a finer bilateral lattice (srgb=3).
    H, W, L = 60, 80, 21
    logits = _smooth_logits(L, H, W, seed=3)
    image = _random_image(H, W, seed=4)
    g, b = dict(sxy=3, compat=3), dict(sxy=67, srgb=3, compat=4)
    ref = _pydensecrf_q(-torch.log_softmax(logits, 0), image, 10, g, b)
    _assert_parity(fastseg.dense_crf(logits, image, iterations=10, gaussian=g, bilateral=b), ref)


def test_shim_matches_pydensecrf():
    dcrf = _pydensecrf()
    H, W, L = 40, 52, 4
    probs = torch.softmax(_smooth_logits(L, H, W, seed=5), 0).numpy()
    rgb = np.ascontiguousarray(_random_image(H, W, seed=6).permute(1, 2, 0).numpy())
    from pydensecrf import utils as pyutils

    U = fastseg.crf.unary_from_softmax(probs, scale=0.9)
    np.testing.assert_allclose(U, pyutils.unary_from_softmax(probs, scale=0.9), rtol=1e-6)
    labels = np.random.default_rng(0).integers(0, L + 1, H * W)
    np.testing.assert_allclose(fastseg.crf.unary_from_labels(labels, L, 0.7),
                               pyutils.unary_from_labels(labels, L, 0.7), rtol=1e-6)
    np.testing.assert_allclose(fastseg.crf.unary_from_labels(labels % L, L, 0.6, zero_unsure=False),
                               pyutils.unary_from_labels(labels % L, L, 0.6, zero_unsure=False), rtol=1e-6)
    results = []
    for module in (dcrf, fastseg.crf):
        d = module.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=(3, 2), compat=3, normalization=module.NORMALIZE_AFTER)
        d.addPairwiseBilateral(sxy=50, srgb=(13, 10, 20), rgbim=rgb, compat=np.arange(1, L + 1, dtype=np.float32))
        Q, tmp1, tmp2 = d.startInference()
        for _ in range(3):
            d.stepInference(Q, tmp1, tmp2)
        results.append((np.array(Q), np.array(d.inference(3)), d.klDivergence(Q)))
    (q_ref, q5_ref, kl_ref), (q, q5, kl) = results
    np.testing.assert_allclose(q, q_ref, atol=1e-4)
    np.testing.assert_allclose(q5, q5_ref, atol=1e-4)
    assert abs(kl - kl_ref) <= 1e-4 * abs(kl_ref)


def test_shim_generic_features_match_pydensecrf():
    dcrf = _pydensecrf()
    N, L = 400, 3  # pydensecrf mishandles addPairwiseEnergy features when N % 4 != 0: keep N % 4 == 0
    g = np.random.default_rng(1)
    U = g.uniform(0.1, 3, (L, N)).astype(np.float32)
    feats = g.uniform(0, 4, (4, N)).astype(np.float32)
    compat = g.normal(size=(L, L)).astype(np.float32)
    results = []
    for module in (dcrf, fastseg.crf):
        d = module.DenseCRF(N, L)
        d.setUnaryEnergy(U)
        d.addPairwiseEnergy(feats, compat=compat, normalization=module.NORMALIZE_BEFORE)
        d.addPairwiseEnergy(feats[:2].copy(), compat=2.0, normalization=module.NO_NORMALIZATION)
        results.append(np.array(d.inference(4)))
    np.testing.assert_allclose(results[1], results[0], atol=1e-4)


def test_shim_copies_its_inputs_and_takes_numpy_parameters():
    """As pydensecrf does: the unary and the features are copied when set (a buffer reused for the
    next image must not change the model), sxy / srgb may be NumPy arrays, and a uint8 label map
    with 0 = unsure works in unary_from_labels."""
    dcrf = _pydensecrf()
    H, W, L = 24, 30, 3
    g = np.random.default_rng(2)
    rgb = g.integers(0, 256, (H, W, 3), dtype=np.uint8)
    labels = g.integers(0, L + 1, (H, W)).astype(np.uint8)
    from pydensecrf import utils as pyutils

    U_ref = pyutils.unary_from_labels(labels.astype(np.int64), L, 0.7)  # its uint8 0 - 1 wraps to 255
    np.testing.assert_array_equal(fastseg.crf.unary_from_labels(labels, L, 0.7), U_ref)
    features = g.uniform(0, 4, (2, H * W)).astype(np.float32)
    results = []
    for module in (dcrf, fastseg.crf):
        U_torch = torch.from_numpy(U_ref.copy())
        feats = features.copy()
        d = module.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(U_torch.numpy() if module is dcrf else U_torch)
        d.addPairwiseGaussian(sxy=np.array([3.0, 2.0]), compat=3)
        d.addPairwiseBilateral(sxy=np.array([40.0, 50.0]), srgb=np.array([13.0, 10.0, 20.0]), rgbim=rgb, compat=5)
        d.addPairwiseEnergy(feats, compat=2.0)
        U_torch.zero_()  # the caller reuses its buffers
        feats *= 3
        results.append(np.array(d.inference(3)))
    np.testing.assert_allclose(results[1], results[0], atol=1e-4)


def test_shim_negative_widths_and_one_label():
    """pydensecrf divides the features by sxy / srgb, so a negative width is its magnitude's kernel
    (fastseg takes the magnitude; 0 stays an error); a one-label CRF is valid there (Q = 1)."""
    dcrf = _pydensecrf()
    H, W, L = 20, 28, 3
    g = np.random.default_rng(7)
    rgb = g.integers(0, 256, (H, W, 3), dtype=np.uint8)
    U = g.uniform(0.1, 3, (L, H * W)).astype(np.float32)
    results = {}
    for module, sign in ((dcrf, 1), (fastseg.crf, 1), (fastseg.crf, -1)):
        d = module.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=sign * 3, compat=3)
        d.addPairwiseBilateral(sxy=(sign * 40, 50), srgb=np.array([13.0, sign * 10.0, 20.0]), rgbim=rgb, compat=5)
        results[module.__name__, sign] = np.array(d.inference(4))
    np.testing.assert_array_equal(results["fastseg.crf", -1], results["fastseg.crf", 1])
    np.testing.assert_allclose(results["fastseg.crf", 1], results[dcrf.__name__, 1], atol=1e-4)
    with pytest.raises(ValueError, match="sxy"):
        fastseg.crf.DenseCRF2D(W, H, L).addPairwiseGaussian(sxy=0, compat=3)
    with pytest.raises(ValueError, match="n_labels"):
        fastseg.crf.DenseCRF2D(W, H, 0)
    kl = {}
    for module in (dcrf, fastseg.crf):
        d = module.DenseCRF2D(W, H, 1)
        d.setUnaryEnergy(U[:1])
        d.addPairwiseBilateral(sxy=40, srgb=13, rgbim=rgb, compat=5)
        Q = d.inference(3)
        q, tmp1, tmp2 = d.startInference()
        d.stepInference(q, tmp1, tmp2)
        np.testing.assert_array_equal(np.array(Q), np.ones((1, H * W), np.float32))
        np.testing.assert_array_equal(np.array(q), np.ones((1, H * W), np.float32))
        kl[module] = d.klDivergence(Q)
    assert abs(kl[fastseg.crf] - kl[dcrf]) <= 1e-4 * abs(kl[dcrf])


def test_shim_hard_constraints():
    """+inf energies (unary_from_softmax(p, clip=None) of one-hot pixels) are hard constraints, as in
    pydensecrf: Q of a forbidden label is 0; every label forbidden at a pixel, or NaN, is an error."""
    dcrf = _pydensecrf()
    L, H, W = 3, 20, 30
    g = np.random.default_rng(4)
    p = g.random((L, H, W)).astype(np.float32) + 0.05
    p[:, :5, :5] = 0
    p[1, :5, :5] = 1
    p[0, 10:12, 10:15] = 0
    p /= p.sum(0)
    with np.errstate(divide="ignore"):
        U = fastseg.crf.unary_from_softmax(p, clip=None)
    assert np.isinf(U).sum() == 60
    results = []
    for module in (dcrf, fastseg.crf):
        d = module.DenseCRF2D(W, H, L)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=3, compat=3)
        results.append(np.array(d.inference(5)))
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)
    assert np.all(results[1][0].reshape(H, W)[10:12, 10:15] <= 1e-30)
    d = fastseg.crf.DenseCRF2D(W, H, L)
    for value, message in ((np.inf, "infinite energy for every label"), (np.nan, "NaN")):
        bad = U.copy()
        bad[:, 7] = value
        with pytest.raises(ValueError, match=message):
            d.setUnaryEnergy(bad)


def test_shim_feature_helpers_match_pydensecrf():
    """pydensecrf.utils' create_pairwise_gaussian / create_pairwise_bilateral (any channel axis, one
    or per-channel scales) and softmax_to_unary, for scripts that build their own features."""
    _pydensecrf()
    from pydensecrf import utils as pyutils

    g = np.random.default_rng(3)
    img = g.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    for args in (((3, 5), (7, 9)), ((2.0,), (11,)), (np.array([1.5, 2.5, 4.0]), (3, 4, 5))):
        ours, theirs = fastseg.crf.create_pairwise_gaussian(*args), pyutils.create_pairwise_gaussian(*args)
        np.testing.assert_array_equal(ours, theirs)
    for args, kwargs in ((((3, 5), (13, 10, 20), img), dict(chdim=2)), (((3, 5), 13, img[..., 0]), {}),
                         (((3, 5), np.array([13.0, 10, 20]), np.moveaxis(img, 2, 0)), dict(chdim=0))):
        ours = fastseg.crf.create_pairwise_bilateral(*args, **kwargs)
        theirs = pyutils.create_pairwise_bilateral(*args, **kwargs)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    p = g.random((4, 7, 9)).astype(np.float32) + 1e-3
    p /= p.sum(0)
    np.testing.assert_allclose(fastseg.crf.softmax_to_unary(p), pyutils.unary_from_softmax(p), rtol=1e-6)


# --- the kernel against the references -----------------------------------------------------------


def _features(image, gaussian=(3.0, 3.0), bilateral=(80.0, 80.0, 13.0)):
    B, C, H, W = image.shape
    g = crf_ops.position_features(H, W, *gaussian).unsqueeze(0)
    b = crf_ops.bilateral_features(image, bilateral[0], bilateral[1], [bilateral[2]] * C)
    return g, b


COMPATS = {
    "potts": lambda L: -3 * torch.eye(L),
    "vector": lambda L: torch.linspace(-4, 1, L).diag(),
    "matrix": lambda L: torch.randn(L, L, generator=torch.Generator().manual_seed(L)),
}


@pytest.mark.parametrize("normalization", [3, 0, 1, 2], ids=["symmetric", "none", "before", "after"])
@pytest.mark.parametrize("compat", list(COMPATS))
@pytest.mark.parametrize("C", [1, 3, 4])
def test_cpp_matches_reference_lattice(C, compat, normalization):
    H, W, L = 23, 31, 6
    image = _random_image(H, W, seed=C, C=C).unsqueeze(0)
    unary = -torch.log_softmax(_smooth_logits(L, H, W, seed=C), 0)
    g, b = _features(image)
    comps = [COMPATS[compat](L), -10 * torch.eye(L)]
    ref = R.mean_field(unary.reshape(L, -1), [g[0].reshape(2, -1), b[0].reshape(2 + C, -1)], comps,
                       [normalization, 3], 5).reshape(L, H, W)
    out = torch.ops.fastseg.dense_crf(unary[None].contiguous(), [g, b], comps, [normalization, 3], 5, None)[0]
    assert (out - ref).abs().max() <= 1e-3
    assert (out - ref).abs().mean() <= 1e-5


@pytest.mark.parametrize("L", [2, 5, 8, 9, 21, 64, 65, 72, 100, 131])
def test_cpp_every_label_row_width(L, poison):
    # Each label-row width has its own code path (4, 8, multiples of 8 up to 64, and the generic
    # heap-backed one above); rows over 64 labels once crashed intermittently (misaligned heap rows).
    H, W, B = 7, 5, 3
    logits = _smooth_logits(L, H, W, seed=L, batch=B)
    image = torch.stack([_random_image(H, W, seed=s) for s in range(B)])
    ref = fastseg.dense_crf(logits, image, iterations=3, backend="reference")
    for _ in range(3):  # an alignment fault depends on where the allocator puts the rows
        q = fastseg.dense_crf(logits, image, iterations=3, backend="cpp")
        assert torch.isfinite(q).all()
        assert (q - ref).norm() / ref.norm() <= 1e-5


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("normalization", ["symmetric", "before", "after", "none"])
def test_cpp_grid_lattice_reuse(normalization):
    # The C++ kernel keeps the Gaussian kernel's lattice (grid positions) for the next image of the
    # same size, kernel width and normalisation: every change of these must rebuild it, and images
    # in between (another size, H and W swapped, another sxy) must not leave a stale one behind.
    L = 5
    calls = [(40, 36, 3.0), (40, 36, 3.0), (36, 40, 3.0), (40, 36, 5.0), (12, 120, 3.0), (40, 36, 3.0)]
    first = {}
    for H, W, sxy in calls:
        logits = _smooth_logits(L, H, W, seed=H + W)
        image = _random_image(H, W, seed=H)
        kw = dict(iterations=3, gaussian=dict(sxy=sxy, compat=3, normalization=normalization),
                  bilateral=dict(sxy=20, srgb=13, compat=5, normalization=normalization))
        q = fastseg.dense_crf(logits, image, backend="cpp", **kw)
        ref = fastseg.dense_crf(logits, image, backend="reference", **kw)
        assert (q - ref).norm() / ref.norm() <= 1e-5
        assert torch.equal(q, first.setdefault((H, W, sxy), q))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backends_agree(backend, device):
    H, W, L, B = 19, 26, 4, 2
    logits = _smooth_logits(L, H, W, seed=9, batch=B).to(device)
    image = torch.stack([_random_image(H, W, seed=s) for s in range(B)]).to(device)
    q = fastseg.dense_crf(logits, image, iterations=4, backend=backend)
    ref = fastseg.dense_crf(logits.cpu(), image.cpu(), iterations=4, backend="reference")
    assert q.device == logits.device and q.dtype == torch.float32 and q.shape == logits.shape
    assert (q.cpu() - ref).abs().max() <= 1e-3


@pytest.mark.parametrize("normalization", [0, 1, 2, 3])
def test_permutohedral_filter_matches_reference(normalization):
    H, W = 21, 17
    image = _random_image(H, W, seed=2).unsqueeze(0)
    _, b = _features(image, bilateral=(5.0, 5.0, 20.0))
    values = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    out = fastseg.ops.permutohedral_filter(values, b, normalization)
    ref = fastseg.ops.permutohedral_filter(values, b, normalization, backend="reference")
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 6, 9])
def test_permutohedral_filter_every_feature_count(d, threads):
    # The C++ lattice build has unrolled copies for d = 2, 3, 5, 6 and a generic one for the rest,
    # and numbers the points with one hash table per thread when the image has >= 2 x 4096 pixels:
    # each combination against the reference, on an image of 93 x 97 = 9021 pixels.
    H, W = 93, 97
    image = _random_image(H, W, seed=d, C=max(d - 2, 1)).unsqueeze(0).float()
    pos = crf_ops.position_features(H, W, 6.0, 6.0).unsqueeze(0)
    features = torch.cat([pos, image / 15.0], 1)[:, :d].contiguous()
    values = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(d))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = fastseg.ops.permutohedral_filter(values, features)
    finally:
        torch.set_num_threads(before)
    ref = fastseg.ops.permutohedral_filter(values, features, backend="reference")
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("normalization", [0, 1, 2, 3])
def test_permutohedral_filter_transpose(normalization):
    # <F(x), y> == <x, F^T(y)>, and F^T equals the transpose of the reference's filter matrix
    # (built column by column from the identity on a tiny image).
    H, W = 7, 6
    N = H * W
    image = _random_image(H, W, seed=4).unsqueeze(0)
    for f in _features(image, bilateral=(5.0, 5.0, 20.0)):
        g = torch.Generator().manual_seed(normalization)
        x, y = torch.rand(2, 3, H, W, generator=g), torch.rand(2, 3, H, W, generator=g)
        op = torch.ops.fastseg.permutohedral_filter
        fx, fty = op(x, f, normalization), op(y, f, normalization, transpose=True)
        lhs, rhs = (fx.double() * y.double()).sum(), (x.double() * fty.double()).sum()
        assert (lhs - rhs).abs() <= 1e-5 * lhs.abs()
        matrix = R.filter_lattice(torch.eye(N), f[0].reshape(f.shape[1], -1).t(), normalization).double()
        expected = (y.reshape(2 * 3, N).double() @ matrix).reshape(y.shape)  # column j of matrix: F(e_j)
        assert torch.linalg.norm(fty.double() - expected) <= 1e-5 * torch.linalg.norm(expected)


def test_lattice_approximates_exact_filter():
    # The lattice approximates the Gaussian (Adams et al. 2010 report errors of a few percent).
    H, W = 12, 14
    image = _random_image(H, W, seed=1).unsqueeze(0)
    g, b = _features(image)
    values = torch.rand(H * W, 2, generator=torch.Generator().manual_seed(1))
    for f, bound in ((g, 0.03), (b, 0.08)):
        feats = f[0].reshape(f.shape[1], -1).t()
        exact = R.filter_bruteforce(values, feats)
        approx = R.filter_lattice(values, feats)
        assert ((exact - approx).abs().mean() / exact.abs().mean()).item() <= bound


def test_lattice_mean_field_approximates_exact_crf():
    H, W, L = 12, 14, 3
    image = _random_image(H, W, seed=2).unsqueeze(0)
    unary = -torch.log_softmax(_smooth_logits(L, H, W, seed=2), 0).reshape(L, -1)
    g, b = _features(image)
    feats = [g[0].reshape(2, -1), b[0].reshape(5, -1)]
    comps = [-1 * torch.eye(L), -2 * torch.eye(L)]  # weak enough that mean field has one fixed point
    exact = R.mean_field_bruteforce(unary, feats, comps, [3, 3], 5)
    lattice = R.mean_field(unary, feats, comps, [3, 3], 5)
    assert (exact - lattice).abs().mean() <= 0.02
    assert (exact.argmax(0) == lattice.argmax(0)).double().mean() >= 0.95


def test_reference_lattice_is_exact_for_one_point_per_simplex_vertex():
    # One feature vector: its lattice filter is alpha * w^T B w (of order 1); its exact filter is 1.
    f = torch.tensor([[0.3, 1.7, 0.2]])
    lat = R.PermutohedralLattice(f)
    assert lat.size == 4 and torch.allclose(lat.weights.sum(1), torch.ones(1))
    assert torch.allclose(R.filter_lattice(torch.ones(1, 1), f, 3), torch.ones(1, 1))


# --- the public op -------------------------------------------------------------------------------


def test_unbatched_and_batched_agree(poison):
    H, W, L = 20, 24, 3
    logits = _smooth_logits(L, H, W, seed=1, batch=3)
    image = torch.stack([_random_image(H, W, seed=s) for s in range(3)])
    q = fastseg.dense_crf(logits, image)
    for b in range(3):
        assert torch.allclose(fastseg.dense_crf(logits[b], image[b]), q[b], atol=1e-6)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(3, H, W), atol=1e-5)


def test_threads_do_not_change_the_result():
    H, W, L = 96, 90, 5
    logits = _smooth_logits(L, H, W, seed=1, batch=3)
    image = torch.stack([_random_image(H, W, seed=s) for s in range(3)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastseg.dense_crf(logits, image)
        torch.set_num_threads(max(2, threads))
        many = fastseg.dense_crf(logits, image)
        single = fastseg.dense_crf(logits[:1], image[:1])
    finally:
        torch.set_num_threads(threads)
    assert (one - many).abs().max() <= 1e-5
    assert (one[:1] - single).abs().max() <= 1e-5


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_cpp_schedule_any_thread_count():
    # The C++ mean field runs as phases (pass, gather, one per blur direction) whose shares go to
    # whichever threads arrive, and must leave its splat buffers zero (with one pixel chunk the
    # splat and blur buffers trade places every iteration, so odd and even iteration counts end
    # differently; several chunks gather only where each chunk splatted): every thread count,
    # oversubscribed ones too, against the reference, and the same call again (after one of
    # another size) bit for bit.
    L = 5
    big = (120, 110)  # 13200 pixels: up to 3 pixel chunks
    small = (20, 30)  # one chunk
    inputs = {}
    for H, W in (big, small):
        inputs[H, W] = (_smooth_logits(L, H, W, seed=H), _random_image(H, W, seed=W))
    before = torch.get_num_threads()
    try:
        for iterations in (0, 1, 2, 3):
            refs = {hw: fastseg.dense_crf(*x, iterations=iterations, backend="reference") for hw, x in inputs.items()}
            for threads in (1, 2, 3, 4):
                torch.set_num_threads(threads)
                first = {}
                for hw in (big, small, big, small):
                    q = fastseg.dense_crf(*inputs[hw], iterations=iterations, backend="cpp")
                    assert (q - refs[hw]).norm() / refs[hw].norm() <= 1e-5, (iterations, threads, hw)
                    assert torch.equal(q, first.setdefault(hw, q)), (iterations, threads, hw)
    finally:
        torch.set_num_threads(before)


def test_unary_kinds_and_zero_iterations():
    H, W, L = 10, 12, 4
    logits = _smooth_logits(L, H, W, seed=3)
    image = _random_image(H, W, seed=3)
    probs = torch.softmax(logits, 0)
    assert torch.allclose(fastseg.dense_crf(logits, image, iterations=0), probs, atol=1e-6)
    q = fastseg.dense_crf(logits, image, iterations=3)
    assert torch.allclose(fastseg.dense_crf(-torch.log_softmax(logits, 0), image, iterations=3, unary="energy"), q, atol=1e-5)
    assert torch.allclose(fastseg.dense_crf(probs, image, iterations=3, unary="probs"), q, atol=1e-4)


@pytest.mark.parametrize("unary", ["logits", "energy", "probs"])
def test_empty_batch(unary):
    # A batch of no images is not bad input: the result is empty too (the value checks see no values).
    q = fastseg.dense_crf(torch.rand(0, 3, 4, 5), torch.zeros(0, 3, 4, 5, dtype=torch.uint8), unary=unary)
    assert q.shape == (0, 3, 4, 5)


def test_multichannel_and_float_images():
    H, W, L = 30, 28, 3
    logits = _smooth_logits(L, H, W, seed=4)
    image = _random_image(H, W, seed=4, C=7)
    q_uint8 = fastseg.dense_crf(logits, image, bilateral=dict(sxy=20, srgb=13, compat=10))
    q_float = fastseg.dense_crf(logits, image.double(), bilateral=dict(sxy=20, srgb=13, compat=10))
    assert torch.allclose(q_uint8, q_float, atol=1e-5)
    # A 7-channel scan with per-channel srgb and no gaussian kernel.
    q = fastseg.dense_crf(logits, image.float() * 10, gaussian=None,
                          bilateral=dict(sxy=10, srgb=[130.0] * 7, compat=5, normalization="after"))
    assert q.shape == (L, H, W) and torch.isfinite(q).all()


def test_layer():
    crf = fastseg.nn.DenseCRF(iterations=3, bilateral=dict(sxy=40, srgb=10, compat=8))
    H, W, L = 16, 18, 3
    logits = _smooth_logits(L, H, W, seed=5, batch=2)
    image = torch.stack([_random_image(H, W, seed=s) for s in range(2)])
    expected = fastseg.dense_crf(logits, image, iterations=3, bilateral=dict(sxy=40, srgb=10, compat=8))
    assert torch.equal(crf(logits, image), expected)
    assert "iterations=3" in repr(crf)


def test_opcheck():
    H, W, L = 9, 11, 3
    image = _random_image(H, W, seed=1).unsqueeze(0)
    g, b = _features(image)
    unary = -torch.log_softmax(_smooth_logits(L, H, W, seed=1), 0)[None].contiguous()
    comps = [-3 * torch.eye(L), torch.randn(L, L)]
    torch.library.opcheck(torch.ops.fastseg.dense_crf.default, (unary, [g, b], comps, [3, 1], 2, None))
    torch.library.opcheck(torch.ops.fastseg.dense_crf.default, (unary, [b], comps[:1], [0], 1, torch.softmax(-unary, 1)))
    torch.library.opcheck(torch.ops.fastseg.permutohedral_filter.default, (torch.rand(2, 3, H, W), b, 3))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    H, W, L = 12, 13, 3
    logits = _smooth_logits(L, H, W, seed=2, batch=1)
    image = _random_image(H, W, seed=2).unsqueeze(0)

    def refine(x, img):
        return fastseg.dense_crf(x * 2, img, iterations=2).argmax(1)

    compiled = torch.compile(refine, fullgraph=True, backend="eager")
    assert torch.equal(compiled(logits, image), refine(logits, image))
    # The C++ kernel checks the scores itself, compiled or not.
    logits[0, 1, 5, 6] = float("nan")
    with pytest.raises(ValueError, match="scores contains non-finite values"):
        compiled(logits, image)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_torch_compile_checks_values(backend, compiler):
    # The checks on values that Python does in eager mode stay in the compiled graph as assertions.
    if backend == "cpp" and not fastseg._backends.EXTENSION_LOADED:
        pytest.skip("fastseg._C not loaded")
    H, W, L = 6, 7, 3
    probs = torch.softmax(_smooth_logits(L, H, W, seed=3, batch=1), 1)
    image = _random_image(H, W, seed=3).unsqueeze(0).float()

    def refine(p, img, compat):
        return fastseg.dense_crf(p, img, unary="probs", iterations=1, gaussian=dict(sxy=3, compat=compat),
                                 backend=backend)

    compiled = torch.compile(refine, fullgraph=True, backend=compiler)
    compat = torch.tensor(3.0)
    torch.testing.assert_close(compiled(probs, image, compat), refine(probs, image, compat))
    bad_probs, bad_image = probs.clone(), image.clone()
    bad_probs[0, 0, 1, 2] = 1.5
    bad_image[0, 2, 3, 3] = float("inf")
    cases = [((bad_probs, image, compat), r"needs scores in \[0, 1\]"),
             ((probs, bad_image, compat), "image contains non-finite values"),
             ((probs, image, torch.tensor(float("nan"))), r"gaussian\['compat'\] must be finite")]
    for args, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            compiled(*args)


@pytest.mark.slow
def test_huge_image_few_labels():
    # 4096 x 4096 = 16.8M pixels, 2 labels: exercises int64 offsets (N * lanes > 2^31 bytes).
    H = W = 4096
    y = torch.arange(H, dtype=torch.float32).view(H, 1)
    x = torch.arange(W, dtype=torch.float32).view(1, W)
    inside = ((x - 2048) ** 2 + (y - 2048) ** 2 < 1000**2).float()
    logits = torch.stack([1 - inside, inside]) * 2 - 1
    image = (inside * 200 + 20).to(torch.uint8).expand(3, H, W)
    q = fastseg.dense_crf(logits, image, iterations=1)
    assert q.shape == (2, H, W)
    assert torch.equal(q.argmax(0), inside.long())


# --- bad input -----------------------------------------------------------------------------------

S = torch.randn(2, 3, 8, 9)
I = torch.randint(0, 256, (2, 3, 8, 9), dtype=torch.uint8)
BAD = [
    (lambda: fastseg.dense_crf([1.0], I), TypeError, "scores must be a torch.Tensor"),
    (lambda: fastseg.dense_crf(S.long(), I), TypeError, "scores must have dtype"),
    (lambda: fastseg.dense_crf(S[0, 0], I), ValueError, "scores must be 3-D or 4-D"),
    (lambda: fastseg.dense_crf(S[:, :1], I), ValueError, "at least 2 labels"),
    (lambda: fastseg.dense_crf(S.index_put((torch.tensor(0),), torch.tensor(float("nan"))), I), ValueError, "non-finite"),
    (lambda: fastseg.dense_crf(S, I[:, :, :7]), ValueError, r"image has spatial size \(7, 9\) but scores has \(8, 9\)"),
    (lambda: fastseg.dense_crf(S, I[:1]), ValueError, "image has batch 1 but scores has batch 2"),
    (lambda: fastseg.dense_crf(S, I[0]), ValueError, "image must be 4-D"),
    (lambda: fastseg.dense_crf(S, I.to(torch.int32)), TypeError, "image must be uint8 or floating point"),
    (lambda: fastseg.dense_crf(S, I.float().fill_(float("inf"))), ValueError, "image contains non-finite"),
    (lambda: fastseg.dense_crf(S), ValueError, "image is required by the bilateral kernel"),
    (lambda: fastseg.dense_crf(S, I, gaussian=dict(sxy=0, compat=3)), ValueError, r"gaussian\['sxy'\] must be > 0"),
    (lambda: fastseg.dense_crf(S, I, bilateral=dict(sxy=80, srgb=-1, compat=3)), ValueError, r"bilateral\['srgb'\] must be > 0"),
    (lambda: fastseg.dense_crf(S, I, bilateral=dict(sxy=80, srgb=[1, 2], compat=3)), ValueError, "one per image channel"),
    (lambda: fastseg.dense_crf(S, I, gaussian=dict(sxy=3, compat=torch.ones(4, 4))), ValueError, r"got shape \(4, 4\)"),
    (lambda: fastseg.dense_crf(S, I, gaussian=dict(sxy=3, compat=torch.ones(2))), ValueError, r"vector of L=3"),
    (lambda: fastseg.dense_crf(S, I, gaussian=dict(sxy=3, compat="x")), TypeError, "must be a number"),
    (lambda: fastseg.dense_crf(S, I, gaussian=dict(sxy=3, compat=3, normalization="sym")), ValueError, "normalization"),
    (lambda: fastseg.dense_crf(S, I, gaussian=dict(sxy=3, colour=3)), TypeError, "unknown keys"),
    (lambda: fastseg.dense_crf(S, I, iterations=-1), ValueError, "iterations must be >= 0"),
    (lambda: fastseg.dense_crf(S, I, iterations=2.5), TypeError, "iterations must be an int"),
    (lambda: fastseg.dense_crf(S, I, unary="log"), ValueError, "unary must be one of"),
    (lambda: fastseg.dense_crf(S, I, unary="probs"), ValueError, r"needs scores in \[0, 1\]"),
    (lambda: fastseg.dense_crf(S, I, backend="cuda"), ValueError, "has no 'cuda' backend"),
    (lambda: fastseg.dense_crf(S, I, bilateral=dict(sxy=1e-30, srgb=13, compat=3)), ValueError, "magnitude"),
    (lambda: fastseg.dense_crf(S, I, gaussian=dict(compat=True)), TypeError, r"gaussian\['compat'\] must be a number.*got a bool"),
    (lambda: fastseg.dense_crf(S, I, bilateral=dict(compat=torch.tensor(3.0, device="meta"))), ValueError,
     r"bilateral\['compat'\] is on meta but scores is on cpu"),
    (lambda: fastseg.dense_crf(S, I, gaussian=dict(sxy=(3, "3"))), TypeError, r"gaussian\['sxy'\] must be a number"),
    (lambda: fastseg.dense_crf(S, I, checkpoint="yes"), TypeError, "checkpoint must be a bool"),
]

# Every check of the layer's options runs when it is built, not at its first forward.
BAD_LAYER = [
    (dict(iterations=-1), ValueError, "DenseCRF: iterations must be >= 0"),
    (dict(iterations="5"), TypeError, "DenseCRF: iterations must be an int"),
    (dict(gaussian=dict(sxy=3, colour=3)), TypeError, "DenseCRF: gaussian has unknown keys"),
    (dict(gaussian=[3, 3]), TypeError, "DenseCRF: gaussian must be a dict"),
    (dict(bilateral=dict(sxy=80, srgb=0)), ValueError, r"DenseCRF: bilateral\['srgb'\] must be > 0"),
    (dict(bilateral=dict(sxy=-80)), ValueError, r"DenseCRF: bilateral\['sxy'\] must be > 0"),
    (dict(gaussian=dict(normalization="sym")), ValueError, r"DenseCRF: gaussian\['normalization'\] must be one of"),
    (dict(unary="log"), ValueError, "DenseCRF: unary must be one of"),
    (dict(checkpoint=1), TypeError, "DenseCRF: checkpoint must be a bool"),
    (dict(learnable="no", num_labels=3), TypeError, "DenseCRF: learnable must be a bool"),
    (dict(backend="gpu"), ValueError, "DenseCRF: backend must be 'auto' or one of"),
    (dict(num_labels=1), ValueError, "DenseCRF: num_labels must be an int >= 2"),
    (dict(learnable=True, num_labels=3, gaussian=dict(compat=float("nan"))), ValueError, "initial weight"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_LAYER, ids=[m for *_, m in BAD_LAYER])
def test_layer_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastseg.nn.DenseCRF(**kwargs)


@pytest.mark.parametrize("backend,device", backend_params(implemented=("reference", "cpp", "triton"), devices=("cpu",)))
def test_every_backend_takes_an_empty_batch_and_refuses_tiny_widths(backend, device):
    scores = S[:0].clone().requires_grad_()
    compat = torch.tensor(3.0, requires_grad=True)
    q = fastseg.dense_crf(scores, I[:0], gaussian=dict(sxy=3, compat=compat), backend=backend)
    assert q.shape == (0, 3, 8, 9)
    q.sum().backward()
    assert scores.grad.shape == scores.shape and compat.grad == 0
    values = torch.zeros(0, 2, 8, 9, requires_grad=True)
    filtered = crf_ops.permutohedral_filter(values, torch.rand(1, 2, 8, 9), backend=backend)
    filtered.sum().backward()
    assert filtered.shape == values.grad.shape == values.shape
    # Lattice coordinates beyond int32: the cpp kernel's own message, from every backend.
    for kernels in (dict(gaussian=dict(sxy=1e-30)), dict(bilateral=dict(srgb=1e-30))):
        with pytest.raises(ValueError, match="features must be finite and of magnitude below about 1e8"):
            fastseg.dense_crf(S, I, backend=backend, **kernels)


def test_float_image_in_unit_range_warns():
    # srgb is in the image's units: a [0, 1] float image with densecrf's 13 has its colour term off.
    with pytest.warns(UserWarning, match=r"values lie in \[0, 1\] but bilateral\['srgb'\] = 13"):
        fastseg.dense_crf(S, I.float() / 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastseg.dense_crf(S, I.float())  # 0..255 floats
        fastseg.dense_crf(S, I)
        fastseg.dense_crf(S, I.float() / 255, bilateral=dict(sxy=80, srgb=0.05, compat=10))  # srgb in its units


@pytest.mark.parametrize("call,error,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [(0, 0, 0, 0), (1, 2, 7, 8), (1, 1, 3, 8)], ids=["first", "last", "row-tail"])
@pytest.mark.parametrize("unary", ["logits", "energy"])
def test_non_finite_scores_anywhere(backend, value, where, unary):
    # The C++ kernel checks while it packs the scores (8 pixels at a time, then a scalar tail: a
    # 9-wide map has both); the reference is checked in Python. Both say the same.
    scores = S.clone()
    scores[where] = value
    with pytest.raises(ValueError, match="scores contains non-finite values"):
        fastseg.dense_crf(scores, I, unary=unary, backend=backend)


def test_non_finite_scores_direct_op_and_float32_overflow():
    U = S.clone()
    U[1, 0, 4, 4] = float("nan")
    f = torch.randn(1, 2, 8, 9)
    with pytest.raises(ValueError, match="scores contains non-finite values"):
        torch.ops.fastseg.dense_crf(U, [f], [-torch.eye(3)], [3], 1, None)
    # Finite in float64, inf once the kernel's float32: an error, not a map of nan.
    big = S.double()
    big[0, 0, 0, 0] = 1e300
    with pytest.raises(ValueError, match="scores contains non-finite values"):
        fastseg.dense_crf(big, I)


def test_bad_input_direct_op_calls():
    U = torch.randn(1, 3, 4, 5)
    f = torch.randn(1, 2, 4, 5)
    with pytest.raises(ValueError, match="compat\\[0\\] must be \\(L, L\\)"):
        torch.ops.fastseg.dense_crf(U, [f], [torch.eye(2)], [3], 1, None)
    with pytest.raises(ValueError, match="features\\[0\\] must be"):
        torch.ops.fastseg.dense_crf(U, [f[:, :, :3]], [torch.eye(3)], [3], 1, None)
    with pytest.raises(ValueError, match="normalization\\[0\\]"):
        torch.ops.fastseg.dense_crf(U, [f], [torch.eye(3)], [7], 1, None)
    with pytest.raises(ValueError, match="one entry per kernel"):
        torch.ops.fastseg.dense_crf(U, [f], [], [3], 1, None)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_raw_op_fakes_check_like_the_kernel():
    """torch.compile traces a raw op call on its fake: what the kernel refuses fails there, with the
    kernel's message, not when the compiled code runs."""
    U, f = torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5)
    cases = [((U.double(), [f], [torch.eye(3)], [3], 1, None), "unary must be float32"),
             ((U, [f.double()], [torch.eye(3)], [3], 1, None), r"features\[0\] must be float32"),
             ((U, [f], [torch.eye(2)], [3], 1, None), r"compat\[0\] must be \(L, L\)")]
    for args, message in cases:
        for op in (torch.ops.fastseg.dense_crf, torch.ops.fastseg.dense_crf_iterates_cpp):
            with pytest.raises(Exception, match=message):
                torch.compile(op, backend="eager", fullgraph=True)(*args)
            with pytest.raises((TypeError, ValueError), match=message):
                op(*args)  # the kernel itself, same words
    with pytest.raises(Exception, match="values and features must be float32"):
        torch.compile(torch.ops.fastseg.permutohedral_filter, backend="eager", fullgraph=True)(U.double(), f, 3)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_cpp_flushes_denormals_only_inside_the_call():
    # Mean field and its backward flush values below float's normal range to zero on their threads
    # (splats of tiny Q took microcode assists) and must leave the calling thread's mode as it was.
    L, H, W = 4, 12, 10
    logits = 100 * _smooth_logits(L, H, W, seed=3)  # energies 80+ apart: tiny Q, tiny splats
    image = _random_image(H, W, seed=3)
    scores = {backend: logits.clone().requires_grad_() for backend in ("cpp", "reference")}
    q = {b: fastseg.dense_crf(x, image, iterations=3, backend=b) for b, x in scores.items()}
    assert torch.isfinite(q["cpp"]).all() and (q["cpp"] - q["reference"]).abs().max() <= 1e-5
    weights = torch.randn(q["cpp"].shape, generator=torch.Generator().manual_seed(3))
    grads = {b: torch.autograd.grad((q[b] * weights).sum(), scores[b])[0] for b in scores}
    assert (grads["cpp"] - grads["reference"]).norm() <= 1e-5 * grads["reference"].norm()
    tiny = torch.tensor([1e-38], dtype=torch.float32) / 10  # a denormal, not flushed to 0
    assert tiny.item() > 0

"""fastseg.dense_crf against pydensecrf2 (Kraehenbuehl's densecrf), end to end on the CPU.

Both get the same unary energies (B, L, H, W) and uint8 RGB images and run the whole inference,
lattice builds included: pydensecrf2 one image at a time (it has no batch), fastseg on the batch.
Cases: a VOC-sized image (500x375, 21 labels) with densecrf's default kernels (gaussian sxy=3
compat=3, bilateral sxy=80 srgb=13 compat=10) at 5 and 10 iterations; the same with DeepLab-v2's
VOC kernels (bilateral sxy=67 srgb=3 compat=4, gaussian compat=3: a ~10x larger lattice); 1024x1024;
and a batch of 8 at 512x512. On a GPU (``fastseg bench --device cuda --ops crf``) the triton backend
runs at issue 4's shapes beside the CPU path and pydensecrf2, forward and forward+backward.
"""
import functools

import numpy as np
import pytest
import torch

import fastseg
from conftest import DEVICES, FASTSEG, shapes

DEFAULT = (dict(sxy=3, compat=3), dict(sxy=80, srgb=13, compat=10))
VOC = (dict(sxy=3, compat=3), dict(sxy=67, srgb=3, compat=4))
# (name, batch, height, width, labels, iterations, kernels)
CASES = shapes(
    [
        ("500x375 L21 default", 1, 375, 500, 21, 5, DEFAULT),
        ("500x375 L21 default", 1, 375, 500, 21, 10, DEFAULT),
        ("500x375 L21 deeplab-voc", 1, 375, 500, 21, 10, VOC),
        ("1024x1024 L21 default", 1, 1024, 1024, 21, 5, DEFAULT),
        ("8x512x512 L21 default", 8, 512, 512, 21, 5, DEFAULT),
    ],
    [("smoke", 2, 24, 32, 3, 2, DEFAULT), ("smoke voc", 1, 20, 28, 4, 2, VOC)],
)
IMPLS = [FASTSEG, "pydensecrf2"]
# The CPU cases (fastseg's C++ path beside pydensecrf2), left out of a run on the GPU alone.
CPU_ONLY = pytest.mark.skipif("cpu" not in DEVICES, reason="a CPU benchmark; this run is for " + ",".join(DEVICES))


@functools.lru_cache(maxsize=2)
def _inputs(B, H, W, L):
    """Smooth random energies and blocky noisy RGB images, both fixed by the shape."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(B, L, max(H // 16, 2), max(W // 16, 2), generator=g) * 3
    logits = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    unary = (-torch.log_softmax(logits, 1)).contiguous()
    blocks = torch.randint(0, 256, (B, 3, max(H // 24, 2), max(W // 24, 2)), generator=g).float()
    image = torch.nn.functional.interpolate(blocks, size=(H, W), mode="nearest")
    image = (image + 10 * torch.randn(image.shape, generator=g)).clamp(0, 255).to(torch.uint8).contiguous()
    return unary, image


def _pydensecrf(unary, image, iterations, gaussian, bilateral):
    dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is not installed")
    B, L, H, W = unary.shape
    energies = [np.ascontiguousarray(u.reshape(L, -1).numpy()) for u in unary]
    rgbs = [np.ascontiguousarray(im.permute(1, 2, 0).numpy()) for im in image]

    def run():
        out = []
        for U, rgb in zip(energies, rgbs):
            d = dcrf.DenseCRF2D(W, H, L)
            d.setUnaryEnergy(U)
            d.addPairwiseGaussian(sxy=gaussian["sxy"], compat=gaussian["compat"])
            d.addPairwiseBilateral(sxy=bilateral["sxy"], srgb=bilateral["srgb"], rgbim=rgb, compat=bilateral["compat"])
            out.append(np.array(d.inference(iterations)))
        return out

    return run


@CPU_ONLY
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].replace(' ', '-')}-it{c[5]}")
def test_dense_crf(bench, case, impl):
    name, B, H, W, L, iterations, (gaussian, bilateral) = case
    unary, image = _inputs(B, H, W, L)
    if impl == FASTSEG:
        def fn():
            return fastseg.dense_crf(unary, image, iterations=iterations, gaussian=gaussian,
                                     bilateral=bilateral, unary="energy")
    else:
        fn = _pydensecrf(unary, image, iterations, gaussian, bilateral)
    fn()  # warm up (first-call allocations) outside the timing
    out = bench(f"dense_crf {name} it{iterations} cpu", impl, fn)
    assert len(out) == B


# --- backward: forward+backward against the forward alone (issue 4) -------------------------------
# The learnable layer (CRF-as-RNN) on the same inputs, gradients for the scores, both kernel weights
# and the shared compatibility: 'forward' is the fused no-grad call; 'forward (grad)' the same
# fused passes keeping every iterate; '+backward' adds the reverse sweep (one C++ call: lattices
# built once per image, one transposed lattice filter per kernel and iteration); 'checkpoint' keeps
# only Q_T and recomputes the others in that backward call.
BACKWARD_CASES = shapes(
    [("500x375 L21 default", 1, 375, 500, 21, 5, DEFAULT)],
    [("smoke", 2, 24, 32, 3, 2, DEFAULT)],
    [],  # not in `fastseg bench --quick`: a minute on this CPU, the quick run aims at two in all
)
BACKWARD_IMPLS = ["forward", "forward (grad)", "forward+backward", "forward+backward checkpoint"]


@CPU_ONLY
@pytest.mark.parametrize("impl", BACKWARD_IMPLS)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: f"{c[0].replace(' ', '-')}-it{c[5]}")
def test_dense_crf_backward(bench, case, impl):
    name, B, H, W, L, iterations, (gaussian, bilateral) = case
    unary, image = _inputs(B, H, W, L)
    crf = fastseg.nn.DenseCRF(iterations, gaussian, bilateral, unary="energy", num_labels=L, learnable=True,
                              checkpoint=impl.endswith("checkpoint"))
    weights = torch.randn(unary.shape, generator=torch.Generator().manual_seed(1))
    scores = unary.clone().requires_grad_(impl != "forward")

    def fn():
        if impl == "forward":
            with torch.no_grad():
                return crf(scores, image)
        q = crf(scores, image)
        if impl.startswith("forward+backward"):
            (q * weights).sum().backward()
        return q

    fn()  # warm up outside the timing
    out = bench(f"dense_crf backward {name} it{iterations} cpu", impl, fn)
    assert out.shape == unary.shape


# --- GPU: the triton backend against the CPU path and pydensecrf2 (issue 4) ------------------------
# Issue 4's shapes: B = 1 and 16, 500x375 and 512x512, L = 21, 5 and 10 iterations. 'fastseg' is the
# triton backend on CUDA tensors, end to end (lattice builds included); 'cpu' the cpp backend on the
# same inputs on the CPU; pydensecrf2 one image at a time. Forward is the no-grad call;
# forward+backward is the learnable layer's training step (gradients for the scores and both
# kernels' weights), stored or checkpointed iterates, on either backend.
GPU_CASES = shapes(
    [(f"{B}x{W}x{H} L21", B, H, W, 21, it, DEFAULT)
     for B in (1, 16) for (W, H) in ((500, 375), (512, 512)) for it in (5, 10)],
    [("smoke", 2, 24, 32, 3, 2, DEFAULT)],
)
needs_cuda = pytest.mark.skipif("cuda" not in DEVICES or not torch.cuda.is_available(),
                                reason="the GPU dense CRF cases need a CUDA device (fastseg bench --device cuda)")


@needs_cuda
@pytest.mark.parametrize("impl", [FASTSEG, "cpu", "pydensecrf2"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0].replace(' ', '-')}-it{c[5]}")
def test_dense_crf_gpu(bench, case, impl):
    name, B, H, W, L, iterations, (gaussian, bilateral) = case
    unary, image = _inputs(B, H, W, L)
    device = "cuda" if impl == FASTSEG else "cpu"
    if impl == "pydensecrf2":
        fn = _pydensecrf(unary, image, iterations, gaussian, bilateral)
    else:
        u, im = unary.to(device), image.to(device)

        def fn():
            return fastseg.dense_crf(u, im, iterations=iterations, gaussian=gaussian, bilateral=bilateral,
                                     unary="energy", backend="triton" if impl == FASTSEG else "cpp")
    fn()  # warm up: Triton compiles its kernels on the first call
    out = bench(f"dense_crf gpu {name} it{iterations} forward", impl, fn, device=device)
    assert len(out) == B


GPU_BACKWARD_IMPLS = [FASTSEG, f"{FASTSEG} checkpoint", f"{FASTSEG} forward only", "cpu", "cpu checkpoint"]


@needs_cuda
@pytest.mark.parametrize("impl", GPU_BACKWARD_IMPLS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0].replace(' ', '-')}-it{c[5]}")
def test_dense_crf_gpu_backward(bench, case, impl):
    name, B, H, W, L, iterations, (gaussian, bilateral) = case
    unary, image = _inputs(B, H, W, L)
    device = "cpu" if impl.startswith("cpu") else "cuda"
    crf = fastseg.nn.DenseCRF(iterations, gaussian, bilateral, unary="energy", num_labels=L, learnable=True,
                              checkpoint=impl.endswith("checkpoint"),
                              backend="cpp" if device == "cpu" else "triton").to(device)
    weights = torch.randn(unary.shape, generator=torch.Generator().manual_seed(1)).to(device)
    scores = unary.to(device).clone().requires_grad_()
    im = image.to(device)

    def fn():
        if impl.endswith("forward only"):
            with torch.no_grad():
                return crf(scores, im)
        q = crf(scores, im)
        (q * weights).sum().backward()
        return q

    fn()  # warm up outside the timing
    out = bench(f"dense_crf gpu {name} it{iterations} forward+backward", impl, fn, device=device)
    assert out.shape == unary.shape

"""Shared test tables: which backends run on which device here, and the tolerance rules."""
import pytest
import torch

from fastseg import _backends

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params(implemented=_backends.BACKENDS, devices=("cpu", "cuda")):
    """(backend, device) pytest params for every backend an op implements, skipped with the
    reason where it cannot run here."""
    params = []
    for device in devices:
        for backend in implemented:
            if (backend, device) in (("cpp", "cuda"), ("cuda", "cpu"), ("cudnn", "cpu")):
                continue  # never meaningful
            reason = _backends.unavailable_reason(backend, device)
            if reason is None and device == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA device"
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            if reason is None and device == "cpu" and backend == "triton":
                marks.append(pytest.mark.triton_interpreter)
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


# ||out - ref|| / ||ref|| against a float64 reference (DEVELOPERS.md); NaN never passes.
RELATIVE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def relative_error(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denominator = ref.norm()
    return float((out - ref).norm() / denominator) if denominator > 0 else float((out - ref).norm())


def assert_relative_close(out, ref, dtype, tolerance=None):
    tolerance = RELATIVE_TOLERANCE[dtype] if tolerance is None else tolerance
    error = relative_error(out, ref)
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance:.3g} ({dtype})"


def skip_if_interpreter_lacks(backend, device, dtype, case=None, cases=(), interpreter_cases=()):
    """Triton on the CPU runs under the (slow) interpreter: float32/bfloat16 only, and only the
    cases an op's test lists in ``interpreter_cases`` (indices into ``cases``)."""
    if backend == "triton" and device == "cpu":
        if dtype in (torch.float16, torch.float64):
            pytest.skip("float16/float64 run on the GPU; the interpreter covers float32 and bfloat16")
        if case is not None and cases.index(case) not in interpreter_cases:
            pytest.skip("a case left to the GPU run (the interpreter is slow)")


def assert_trains_like_float64(layer, ref, run, run_ref, steps=3):
    """``steps`` forward and backward passes of a float32 ``layer`` (``run()``) and of ``ref``, a
    float64 plain-PyTorch module with the same parameters in the same order (``run_ref()``), with the
    same output gradients: outputs and parameter gradients within float32's tolerance."""
    for _ in range(steps):
        layer.zero_grad()
        ref.zero_grad()
        out, expected = run(), run_ref()
        grad = torch.randn(out.shape)
        out.backward(grad)
        expected.backward(grad.double())
        assert_relative_close(out.detach(), expected.detach(), torch.float32)
        for mine, theirs in zip(layer.parameters(), ref.parameters(), strict=True):
            assert_relative_close(mine.grad, theirs.grad, torch.float32)

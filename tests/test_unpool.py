"""fastseg.max_unpool2d on every backend against ATen's F.max_unpool2d (bit-equal), its gradient,
its custom ops, and every bad input."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastseg
from common import backend_params

BACKENDS = backend_params(fastseg.ops.unpool._IMPLEMENTED)
# ATen's kernel keeps any one of repeated indices (on CUDA, and on the CPU in channels_last or with
# several threads); the others resolve them in flat order, later wins.
ANY_OF_REPEATS = "aten"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]

# (input shape pooled from, kernel_size, stride, padding, ceil_mode): SegNet's 2x2/2, overlapping
# windows (3/2, 3/1: duplicated indices, later wins), gaps (2/3), odd sizes, padding, ceil_mode.
POOLINGS = [
    ((2, 3, 8, 8), 2, 2, 0, False),
    ((2, 3, 9, 11), 2, 2, 0, True),
    ((1, 4, 13, 7), 3, 2, 1, False),
    ((2, 5, 9, 10), 3, 2, 1, True),
    ((1, 6, 10, 9), 3, 1, 1, False),
    ((3, 2, 11, 12), 2, 3, 0, False),
    ((1, 3, 12, 10), (3, 2), (2, 1), (1, 0), False),
    ((1, 1, 1, 1), 1, 1, 0, False),
]


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def _pooled(shape, kernel, stride, padding, ceil_mode, dtype=torch.float32, device="cpu", seed=0):
    """max_pool2d indices of a random map, and independent random values (so that where indices
    repeat, which entry wins is visible)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    _, indices = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)
    values = torch.randn(indices.shape, generator=generator, dtype=torch.float64).to(dtype)
    return values.to(device), indices.to(device)


def _aten(values, indices, *args, **kwargs):
    # The oracle is ATen's NCHW CPU kernel on one thread, where repeated indices resolve in flat
    # order (later wins). With more threads, or channels_last, ATen resolves them in a
    # thread-dependent order (it flags itself nondeterministic), so it runs outside the `poison`
    # fixture's deterministic mode.
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(1)
    try:
        return F.max_unpool2d(values.cpu().contiguous(), indices.cpu().contiguous(), *args, **kwargs)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _assert_unpooled(out, values, indices, expected, backend):
    """Bit-equal to the oracle; for ATen's own kernel, where indices repeat, any one of the values
    pointing at a position (each still bit-exact)."""
    out = out.cpu()
    if backend != ANY_OF_REPEATS:
        assert torch.equal(out, expected)
        return
    B, C, Ho, Wo = out.shape
    flat_out, flat_idx = out.reshape(B, C, Ho * Wo), indices.cpu().reshape(B, C, -1)
    writers = torch.zeros(B, C, Ho * Wo, dtype=torch.long).scatter_add_(2, flat_idx, torch.ones_like(flat_idx))
    once = writers <= 1
    assert torch.equal(flat_out[once], expected.reshape(B, C, -1)[once])
    # Every position written by several entries holds the value of one of them.
    hit = (flat_out.gather(2, flat_idx) == values.cpu().reshape(B, C, -1)).long()
    any_hit = torch.zeros_like(writers).scatter_reduce_(2, flat_idx, hit, reduce="amax")
    assert bool(any_hit[~once].all())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pooling", POOLINGS, ids=str)
def test_matches_aten(pooling, dtype, layout, backend, device, poison):
    shape, kernel, stride, padding, ceil_mode = pooling
    values, indices = _pooled(shape, kernel, stride, padding, ceil_mode, dtype, device)
    values, indices = _layout(values, layout), _layout(indices, layout)
    out = fastseg.max_unpool2d(values, indices, kernel, stride, padding, output_size=shape[-2:], backend=backend)
    expected = _aten(values, indices, kernel, stride, padding, output_size=shape[-2:])
    assert out.dtype == dtype and out.device.type == device
    _assert_unpooled(out, values, indices, expected, backend)
    if layout == "channels_last" and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_indices_outside_their_windows(layout, backend, device, poison):
    # Legal for F.max_unpool2d: any position in the plane, with repeats (scatter path).
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(2, 3, 5, 6, generator=generator)
    indices = torch.randint(0, 10 * 12, (2, 3, 5, 6), generator=generator)
    out = fastseg.max_unpool2d(
        _layout(values, layout).to(device), _layout(indices, layout).to(device), 2, backend=backend
    )
    _assert_unpooled(out, values, indices, _aten(values, indices, 2), backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 96, 80), (1, 3, 64, 50)])
def test_few_large_planes(shape, layout, backend, device, poison):
    # Fewer planes than threads: the CPU kernel splits rows within a plane instead.
    if backend == "triton" and device == "cpu":
        shape = shape[:2] + (24, 20)
    values, indices = _pooled(shape, 2, 2, 0, False, device=device)
    values, indices = _layout(values, layout), _layout(indices, layout)
    out = fastseg.max_unpool2d(values, indices, 2, backend=backend)
    assert torch.equal(out.cpu(), _aten(values, indices, 2))
    # One index moved out of its window sends that plane down the scatter path.
    indices = indices.clone()
    indices[0, 0, 0, 0] = indices[0, 0, -1, -1]
    out = fastseg.max_unpool2d(values, indices, 2, backend=backend)
    _assert_unpooled(out, values, indices, _aten(values, indices, 2), backend)


# channels_last with 128 bytes of channels per pixel and more: the CPU kernel selects each output
# pixel from its window's entries (no scatter) where windows overlap in neither direction. The
# poolings above have at most 6 channels. 40 float16 channels (80 bytes) stay on the scatter.
WIDE_POOLINGS = [
    ((2, 72, 8, 8), 2, 2, 0, False),
    ((1, 72, 9, 11), 2, 2, 0, False),  # output 9x11, one row and column past the default 8x10
    ((2, 40, 9, 11), 2, 2, 0, True),
    ((2, 36, 11, 12), 2, 3, 0, False),  # gaps between windows
    ((1, 72, 12, 10), (2, 3), (2, 3), (1, 1), False),  # padding: clipped first and last windows
    ((1, 72, 13, 7), 3, 2, 1, False),  # overlapping windows: the scatter
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pooling", WIDE_POOLINGS, ids=str)
def test_many_channels_channels_last(pooling, dtype, backend, device, poison):
    shape, kernel, stride, padding, ceil_mode = pooling
    if backend == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("the interpreter is slow; float32 covers the Triton kernel's wide case")
    values, indices = _pooled(shape, kernel, stride, padding, ceil_mode, dtype, device)
    values, indices = _layout(values, "channels_last"), _layout(indices, "channels_last")
    out = fastseg.max_unpool2d(values, indices, kernel, stride, padding, output_size=shape[-2:], backend=backend)
    expected = _aten(values, indices, kernel, stride, padding, output_size=shape[-2:])
    _assert_unpooled(out, values, indices, expected, backend)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("move", ["to a named position", "to an unnamed position", "to another row"])
def test_many_channels_index_outside_its_window(move, backend, device, poison):
    # One index leaves its window. Moved along its row it still passes the CPU kernel's scan of
    # window rows, and the select must notice it and send the image to the scatter.
    values, indices = _pooled((2, 64, 8, 12), 2, 2, 0, False, device=device)
    indices = indices.clone()
    if move == "to a named position":  # the position its right neighbour names: a repeat, later wins
        indices[1, 5, 2, 3] = indices[1, 5, 2, 4]
    elif move == "to an unnamed position":  # one its right neighbour's window holds, not named
        window = [row * 12 + col for row in (4, 5) for col in (8, 9)]  # pooled (2, 4)'s window
        indices[1, 5, 2, 3] = next(p for p in window if p != indices[1, 5, 2, 4].item())
    else:
        indices[1, 5, 2, 3] = 0
    values, indices = _layout(values, "channels_last"), _layout(indices, "channels_last")
    out = fastseg.max_unpool2d(values, indices, 2, backend=backend)
    _assert_unpooled(out, values, indices, _aten(values, indices, 2), backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_output_size(backend, device, poison):
    values, indices = _pooled((2, 3, 9, 9), 2, 2, 0, False, device=device)  # pooled to 4x4
    for output_size in [(9, 9), (9, 8), (2, 3, 9, 9), torch.Size([2, 3, 8, 9])]:
        out = fastseg.max_unpool2d(values, indices, 2, output_size=output_size, backend=backend)
        assert torch.equal(out.cpu(), _aten(values, indices, 2, output_size=output_size))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unbatched(backend, device, poison):
    values, indices = _pooled((3, 8, 10), 2, 2, 0, False, device=device)
    out = fastseg.max_unpool2d(values, indices, 2, backend=backend)
    assert out.shape == (3, 8, 10)
    assert torch.equal(out.cpu(), _aten(values, indices, 2))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    values = torch.empty(0, 3, 4, 4, device=device)
    out = fastseg.max_unpool2d(values, values.long(), 2, backend=backend)
    assert out.shape == (0, 3, 8, 8)


def test_poison_fixture_poisons(poison):
    # The guarantee the `poison` fixture gives the kernels' outputs.
    assert torch.isnan(torch.empty(64)).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", [2, 3])
def test_gradcheck(kernel, layout, backend, device):
    # Numerical Jacobians call the op twice per element: a smaller case under the interpreter.
    shape = (1, 2, 6, 6) if (backend, device) == ("triton", "cpu") else (2, 3, 6, 6)
    values, indices = _pooled(shape, kernel, kernel, 0, False, torch.float64, device)
    values, indices = _layout(values, layout), _layout(indices, layout)
    values.requires_grad_()

    def unpool(v):
        return fastseg.max_unpool2d(v, indices, kernel, backend=backend)

    assert torch.autograd.gradcheck(unpool, (values,))
    assert torch.autograd.gradgradcheck(unpool, (values,))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient_matches_aten_with_repeated_indices(backend, device):
    # Overlapping windows repeat indices; like ATen, every entry gets its position's gradient.
    values, indices = _pooled((2, 3, 9, 9), 3, 1, 1, False, device=device)
    values.requires_grad_()
    out = fastseg.max_unpool2d(values, indices, 3, 1, 1, backend=backend)
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, values, grad)
    reference = values.detach().cpu().requires_grad_()
    (theirs,) = torch.autograd.grad(F.max_unpool2d(reference, indices.cpu(), 3, 1, 1), reference, grad.cpu())
    assert torch.equal(ours.cpu(), theirs)


def _ops_for(backend):
    if backend == "triton":
        return torch.ops.fastseg.max_unpool2d_triton, torch.ops.fastseg.max_unpool2d_backward_triton
    return torch.ops.fastseg.max_unpool2d, torch.ops.fastseg.max_unpool2d_backward


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] not in ("reference", "aten")])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, backend, device):
    forward, backward = _ops_for(backend)
    values, indices = _pooled((2, 3, 6, 7), 2, 2, 0, False, device=device)
    values, indices = _layout(values, layout), _layout(indices, layout)
    torch.library.opcheck(forward, (values.requires_grad_(), indices, [2, 2], [2, 2], [0, 0], [6, 7]))
    grad = _layout(torch.randn(2, 3, 6, 7, device=device), layout)
    torch.library.opcheck(backward, (grad.requires_grad_(), indices))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("cpp", "cuda", "reference")])
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    values, indices = _pooled((2, 3, 8, 8), 2, 2, 0, False, device=device)

    @torch.compile(fullgraph=True)
    def decode(v, i):
        return fastseg.max_unpool2d(v * 2, i, 2, backend=backend) + 1

    assert torch.equal(decode(values, indices).cpu(), _aten(values * 2, indices, 2) + 1)
    if device == "cpu":  # the index check holds in the compiled graph (the reference's as an assertion)
        bad = indices.clone()
        bad[1, 2, 3, 3] = 64
        with pytest.raises((IndexError, RuntimeError), match="outside the output plane of 8x8"):
            decode(values, bad)


def test_layer_matches_torch_layer():
    values, indices = _pooled((2, 3, 9, 9), 3, 2, 1, False)
    layer, theirs = fastseg.nn.MaxUnpool2d(3, 2, 1), torch.nn.MaxUnpool2d(3, 2, 1)
    assert torch.equal(layer(values, indices, output_size=(9, 9)), theirs(values, indices, output_size=(9, 9)))
    assert "kernel_size=3, stride=2, padding=1" in repr(layer)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad_value", [-1, 64, 10**12])
def test_index_out_of_range(bad_value, backend, device):
    values, indices = _pooled((1, 2, 8, 8), 2, 2, 0, False, device=device)
    indices[0, 1, 2, 3] = bad_value
    with pytest.raises(IndexError, match=rf"indices contains {bad_value}, outside the output plane of 8x8"):
        fastseg.max_unpool2d(values, indices, 2, backend=backend)
    # The backward op guards itself too (it can be called directly).
    backward = _ops_for(backend)[1] if backend not in ("reference", "aten") else None  # aten: no op of its own
    if backward is not None:
        with pytest.raises(IndexError, match="outside the output plane"):
            backward(torch.randn(1, 2, 8, 8, device=device), indices)


BAD_CALLS = [
    # (description, args builder, exception, message pattern)
    ("input not a tensor", lambda v, i: ([[1.0]], i, 2), TypeError, "input must be a torch.Tensor"),
    ("2-D input", lambda v, i: (v[0, 0], i[0, 0], 2), ValueError, "input must be 3-D or 4-D, got 2-D"),
    ("5-D input", lambda v, i: (v[None], i[None], 2), ValueError, "input must be 3-D or 4-D, got 5-D"),
    ("integer input", lambda v, i: (i, i, 2), TypeError, "input must have dtype"),
    ("int32 indices", lambda v, i: (v, i.int(), 2), TypeError, "indices must have dtype int64; got int32"),
    ("shape mismatch", lambda v, i: (v, i[:, :, :, :3], 2), ValueError,
     r"indices has shape \(2, 3, 4, 3\) but input has shape \(2, 3, 4, 4\)"),
    ("devices differ", lambda v, i: (v, i.to("meta"), 2), ValueError, "input is on cpu but indices is on meta"),
    ("empty spatial", lambda v, i: (v[:, :, :0], i[:, :, :0], 2), ValueError, "empty spatial dimension"),
    ("zero kernel", lambda v, i: (v, i, 0), ValueError, "kernel_size must be >= 1"),
    ("three kernel sizes", lambda v, i: (v, i, (2, 2, 2)), TypeError, "kernel_size must be an int or a pair"),
    ("negative padding", lambda v, i: (v, i, 2, 2, -1), ValueError, "padding must be >= 0"),
    ("output_size too large", lambda v, i: (v, i, 2, 2, 0, (10, 8)), ValueError,
     r"output_size\[0\] = 10 is not strictly between 6 and 10"),
    ("output_size wrong length", lambda v, i: (v, i, 2, 2, 0, (8,)), ValueError, "output_size must have 2"),
    ("output_size not ints", lambda v, i: (v, i, 2, 2, 0, "ab"), TypeError, "output_size must be a sequence"),
    ("output_size floats", lambda v, i: (v, i, 2, 2, 0, (8.9, 8.9)), TypeError, "output_size must be a sequence of ints"),
]


@pytest.mark.parametrize("description,build,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input(description, build, error, message):
    values, indices = _pooled((2, 3, 8, 8), 2, 2, 0, False)
    with pytest.raises(error, match=message):
        fastseg.max_unpool2d(*build(values, indices))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch_backward(backend, device):
    values, indices = _pooled((0, 3, 8, 8), 2, 2, 0, False)
    values = values.to(device).requires_grad_()
    out = fastseg.max_unpool2d(values, indices.to(device), 2, backend=backend)
    grad_out = torch.randn_like(out).requires_grad_()
    (grad,) = torch.autograd.grad(out, values, grad_out, create_graph=True)
    assert out.shape == (0, 3, 8, 8) and grad.shape == values.shape
    if backend != "aten":  # (ATen's own backward returns a gradient without history at B = 0)
        grad.sum().backward()  # double backward, into grad_out
        assert grad_out.grad.shape == out.shape


def test_bad_backend():
    values, indices = _pooled((1, 1, 4, 4), 2, 2, 0, False)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fastseg.max_unpool2d(values, indices, 2, backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable for cpu tensors"):
        fastseg.max_unpool2d(values, indices, 2, backend="cuda")
    with pytest.raises(ValueError, match="has no 'cudnn' backend"):  # a backend other ops have
        fastseg.max_unpool2d(values, indices, 2, backend="cudnn")


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_compiled_op_checks_its_arguments():
    # Direct calls of the registered op bypass the Python checks; the C++ entry checks again.
    values, indices = _pooled((1, 2, 4, 4), 2, 2, 0, False)
    with pytest.raises(ValueError, match="indices has shape"):
        torch.ops.fastseg.max_unpool2d(values, indices[..., :1], [2, 2], [2, 2], [0, 0], [4, 4])
    with pytest.raises(TypeError, match="indices must be int64"):
        torch.ops.fastseg.max_unpool2d(values, indices.int(), [2, 2], [2, 2], [0, 0], [4, 4])
    with pytest.raises(ValueError, match="output_size must be positive"):
        torch.ops.fastseg.max_unpool2d(values, indices, [2, 2], [2, 2], [0, 0], [0, 4])


def test_import_without_extension_falls_back_with_one_warning():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastseg, torch, torch.nn.functional as F\n"
        "print(len([w for w in caught if 'fastseg._C is not available' in str(w.message)]))\n"
        "x = torch.randn(1, 2, 6, 6); v, i = F.max_pool2d(x, 2, return_indices=True)\n"
        "print(torch.equal(fastseg.max_unpool2d(v, i, 2), F.max_unpool2d(v, i, 2)))\n"
        "try:\n"
        "    fastseg.max_unpool2d(v, i, 2, backend='cpp')\n"
        "except RuntimeError as e:\n"
        "    print('cpp unavailable' if 'FASTSEG_NO_EXTENSION' in str(e) else e)\n"
    )
    env = dict(os.environ, FASTSEG_NO_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True", "cpp", "unavailable"]



@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_export_with_dynamic_sizes():
    # torch.export with dynamic H and W: the unpooled size stays symbolic (int() of it made the
    # export fail, "specialized it to be a constant"), the default size and an explicit one alike.
    from torch.export import Dim

    class Unpool(torch.nn.Module):
        def forward(self, values, indices, like):
            return fastseg.max_unpool2d(values, indices, 2), fastseg.max_unpool2d(values, indices, 2,
                                                                                  output_size=like.shape)

    g = torch.Generator().manual_seed(0)
    values, indices = F.max_pool2d(torch.randn(2, 3, 10, 12, generator=g), 2, return_indices=True)
    like = torch.empty(2, 3, 10, 12)
    h, w = Dim("h", min=2, max=32), Dim("w", min=2, max=32)
    program = torch.export.export(Unpool(), (values, indices, like),
                                  dynamic_shapes=({2: h, 3: w}, {2: h, 3: w}, {2: 2 * h, 3: 2 * w}))
    values, indices = F.max_pool2d(torch.randn(2, 3, 14, 18, generator=g), 2, return_indices=True)
    outs = program.module()(values, indices, torch.empty(2, 3, 14, 18))
    for out in outs:
        assert torch.equal(out, F.max_unpool2d(values, indices, 2))

"""Compile every Triton kernel fastseg launches for real GPUs, on a machine without one.

The interpreter (TRITON_INTERPRET=1), which runs the Triton tests on the CPU, accepts code that
the compiler rejects (a GPU run found one: a kernel reading a plain Python global). This script
runs each launcher in kernels/ on small CPU tensors with the launch replaced by a compilation for
each target in TARGETS (Triton's front end, its GPU passes and ptxas: no device needed), every
autotune config included. The kernels do not run, so outputs are garbage; only compilation is
checked. Run by tests/test_triton_compiles.py in a subprocess, since the interpreter must be off.

    python tests/triton_compile_check.py   # prints one line per compiled kernel variant
"""
import os
import sys
import time

START = time.perf_counter()

assert os.environ.get("TRITON_INTERPRET") != "1", "run with the Triton interpreter off"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

TARGETS = [GPUTarget("cuda", 90, 32)]  # Hopper (H100/H200), the cards lent here
compiled = set()


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
    bound = dict(zip(self.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for p in self.params:
        value = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        else:
            signature[p.name] = mangle_type(value)
    key = (self.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
           tuple(sorted(options.items())))
    if key not in compiled:
        for target in TARGETS:
            triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs), target=target,
                           options=options)
        compiled.add(key)
        print(f"{time.perf_counter() - START:6.1f} s", self.fn.__name__, constexprs, options, flush=True)


def _every_config(self, *args, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):
        self.fn.run(*args, **kwargs, **config.all_kwargs())


JITFunction.run = _compile_instead_of_launch
Autotuner.run = _every_config
# Nothing is launched: the grids are never evaluated and the CPU tensors only give types.

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastseg.kernels import atrous, dense_crf, taps_conv, unpool, unpool_conv  # noqa: E402


def main():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 8, 9, 9, generator=g).to(dtype).contiguous(memory_format=fmt)
            w = torch.randn(16, 8, 3, 3, generator=g).to(dtype)
            s = torch.rand(16, generator=g).to(dtype)
            r = torch.randn(2, 16, 9, 9, generator=g).to(dtype)
            for relu in (False, True):
                atrous.atrous_conv2d(x, w, s, s, r, (1, 1), (2, 2), (2, 2), 1, relu)
            atrous.atrous_conv2d(x, w, None, None, None, (2, 2), (1, 1), (1, 1), 1, False)
            values, indices = torch.nn.functional.max_pool2d(x.float(), 2, return_indices=True)
            values = values.to(dtype)
            unpool.max_unpool2d(values, indices, (2, 2), (2, 2), (0, 0), (9, 9))
            unpool.max_unpool2d_backward(x, torch.zeros_like(x, dtype=torch.int64))
            weight = torch.randn(16, 8, 3, 3, generator=g).to(dtype)
            unpool_conv.unpool_conv2d(values, indices, weight, s, s, r, (2, 2), (2, 2), (0, 0), (9, 9), (1, 1),
                                      (1, 1), True)
            if dtype != torch.float16:  # the taps route's GEMMs run here, on the CPU (no float16 matmul)
                gcn_w = [torch.randn(*shape, generator=g).to(dtype) for shape in ((5, 8, 7, 1), (3, 5, 1, 7),
                                                                                  (5, 8, 1, 7), (3, 5, 7, 1))]
                taps_conv.gcn_conv2d(x, *gcn_w, s[:5], s[:3], None, None, 1)
                taps_conv.gcn_conv2d(x, *gcn_w, None, None, None, None, 2)
                taps_conv.conv_sum(x, [w, w], [(1, 1), (2, 2)], s)
                taps_conv.parallel_conv_bn_relu(x, [w, w], [(1, 1), (3, 3)], [s, s], [s, s])
    # float32 dots with TF32 off (tf32x3), as the GPU tests run them.
    torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(2, 8, 9, 9, generator=g)
    atrous.atrous_conv2d(x, torch.randn(16, 8, 3, 3, generator=g), None, None, None, (1, 1), (1, 1), (1, 1), 1, True)
    torch.backends.cudnn.allow_tf32 = True
    # The 64-bit index variants (tensors of 2^31+ elements), compiled on small ones.
    needs_int64 = unpool.needs_int64
    unpool.needs_int64 = lambda *tensors: True
    values, indices = torch.nn.functional.max_pool2d(torch.randn(2, 8, 9, 9, generator=g), 2, return_indices=True)
    unpool.max_unpool2d(values, indices, (2, 2), (2, 2), (0, 0), (9, 9))
    unpool.max_unpool2d_backward(torch.randn(2, 8, 9, 9, generator=g), indices)
    unpool_conv.unpool_conv2d(values, indices, torch.randn(8, 8, 3, 3, generator=g), None, None, None, (2, 2), (2, 2),
                              (0, 0), (9, 9), (1, 1), (1, 1), False)
    unpool.needs_int64 = needs_int64
    unary = torch.rand(2, 3, 6, 7, generator=g)
    features = [torch.rand(1, 2, 6, 7, generator=g), torch.rand(2, 5, 6, 7, generator=g)]
    compats = [torch.eye(3), torch.eye(3)]
    dense_crf.mean_field(unary, features, compats, [1, 2], 2)
    dense_crf.mean_field(unary, features, compats, [0, 3], 1, init=unary, iterates=True)
    for transpose in (False, True):
        dense_crf.permutohedral_filter(unary, features[1], 1, transpose)
    print(f"{len(compiled)} kernel variants compiled for {len(TARGETS)} targets")


if __name__ == "__main__":
    main()

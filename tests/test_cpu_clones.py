"""The C++ hot loops are compiled for several instruction sets (the baseline, AVX2 and, for the
dense CRF, max-unpooling, the atrous convolution's GEMM and the GCN's FFTs, AVX-512) and one clone
is picked at run time: the widest the CPU runs, capped by the environment variable FASTSEG_CPU_ISA. The rest of the suite runs the widest clone; here each
narrower one reruns the tests of the ops that have clones, in a pytest process of its own (the
variable is read once per process). On a CPU without a clone's instructions the cap changes
nothing and the run repeats the widest clone's tests.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastseg

ROOT = Path(__file__).resolve().parent.parent

# The tests of the ops with cloned loops: the dense CRF (every pass, blur and build clone, forward
# and backward), the atrous convolution's winograd transforms and half-type epilogues (unpool_conv2d's too), the GCN's spectra and max-unpooling's
# index scan and per-pixel select.
CLONED_TESTS = [
    "tests/test_dense_crf.py",
    "tests/test_dense_crf_grad.py",
    "tests/test_atrous.py::test_cpu_paths",
    "tests/test_atrous.py::test_winograd_tilings",
    "tests/test_atrous.py::test_winograd_gemm_shapes",
    "tests/test_atrous.py::test_winograd_blocks_and_chunks",
    "tests/test_atrous.py::test_winograd_uncached_transforms",
    "tests/test_atrous.py::test_cpu_half_epilogue",
    "tests/test_gcn.py::test_cpu_routes",
    "tests/test_gcn.py::test_cpu_fft_route",
    "tests/test_gcn.py::test_cpu_fft_backward",
    "tests/test_unpool.py",
    "tests/test_unpool_conv.py::test_matches_unpool_conv_bn_relu",
]

needs_cpp = pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")


def _run(args, isa, timeout):
    # Without the Triton interpreter: its kernels have no CPU clones, and they are the slow tests.
    env = dict(os.environ, FASTSEG_CPU_ISA=isa, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@needs_cpp
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_narrower_clones_pass_the_op_tests(isa):
    result = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not triton_interpreter", *CLONED_TESTS],
                  isa, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@needs_cpp
def test_bad_isa_setting_is_a_clear_error():
    code = ("import torch, fastseg\n"
            "fastseg.dense_crf(torch.randn(3, 8, 9), torch.zeros(3, 8, 9, dtype=torch.uint8), backend='cpp')\n")
    result = _run(["-c", code], "sse9", timeout=300)
    assert result.returncode != 0
    assert "FASTSEG_CPU_ISA must be base, avx2 or avx512, got 'sse9'" in result.stderr


@needs_cpp
def test_the_picked_clone_is_reported():
    assert fastseg._backends.cpu_isa() in ("base", "avx2", "avx512")
    result = _run(["-c", "import fastseg; print(fastseg._backends.cpu_isa())"], "base", timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "base", result.stdout + result.stderr

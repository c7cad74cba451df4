"""Build fastseg and its one compiled extension, ``fastseg._C``.

The C++ CPU sources are always built. The CUDA sources are built when torch is a CUDA build and
nvcc is found, or when ``FASTSEG_CUDA=1`` forces it (then a missing toolkit is an error);
``FASTSEG_CUDA=0`` skips them. ``FASTSEG_NATIVE=1`` adds ``-march=native`` for a local build,
``FASTSEG_DEBUG=1`` debug information.
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch  # noqa: F401  the extension is compiled against the torch installed here
except ImportError:
    raise SystemExit(
        "fastseg compiles its extension against the installed PyTorch, which pip's isolated build "
        "environment does not see: install torch first, then build with `pip install "
        "--no-build-isolation fastseg` (or `pip install --no-build-isolation .` in a checkout)"
    ) from None

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("FASTSEG_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    import torch

    found = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on"):
        if not found:
            raise RuntimeError(
                "FASTSEG_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME) "
                f"or torch {torch.__version__} is not a CUDA build"
            )
        return True
    return found


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension
    import torch

    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("FASTSEG_NATIVE") == "1":
        cxx.append("-march=native")
    # Python's own CFLAGS carry -g: 20 MB of debug sections in a 2 MB library. FASTSEG_DEBUG=1 keeps them.
    cxx.append("-g" if os.environ.get("FASTSEG_DEBUG") == "1" else "-g0")
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = []
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: build for Turing (T4), Ampere and Hopper, plus PTX for newer cards.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "7.5;8.0;9.0+PTX"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FASTSEG_WITH_CUDA", None))
        ext = CUDAExtension(
            "fastseg._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastseg._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="fastseg",
    version="0.1.0",
    description="Fast fused kernels for the classic semantic-segmentation building blocks",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ (Triton) and benchmarks/ (the suite `fastseg bench` runs) live at the top of the
    # repository and install inside the package.
    packages=find_packages(include=["fastseg", "fastseg.*"]) + ["fastseg.kernels", "fastseg.benchmarks"],
    package_dir={"fastseg.kernels": "kernels", "fastseg.benchmarks": "benchmarks"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "matplotlib", "torchvision", "pydensecrf2", "pillow",
                 "segmentation-models-pytorch"],
        # torchvision and smp: the fastseg.convert rows, which convert their models
        "bench": ["pytest", "pytest-benchmark", "matplotlib", "pydensecrf2", "torchvision",
                  "segmentation-models-pytorch"],
    },
    entry_points={"console_scripts": ["fastseg = fastseg.cli:main"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)

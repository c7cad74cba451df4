import os

import torch

# Triton kernels run on CPU tensors under the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if torch.cuda.is_available():
    # Hold the CUDA oracle to float32: PyTorch lets cuDNN use TF32 for float32 convolutions by
    # default, whose error (~1e-4) is over the float32 tolerance the reference is tested against.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture
def poison():
    """Fill every fresh allocation with NaN (ints with their max) so an output element that a
    kernel forgets to write shows up: torch's deterministic mode poisons at::empty/torch.empty."""
    import torch.utils.deterministic

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    # warn_only: ATen's nondeterministic kernels (CUDA max_unpool2d, the 'aten' backend) still run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    torch.utils.deterministic.fill_uninitialized_memory = previous[2]

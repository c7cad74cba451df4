import pytest
import torch

from fastseg._checks import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 1, 12345, -1])
def test_all_finite_finds_every_nonfinite_value(dtype, bad, where):
    x = torch.randn(3, 21, 37, 53).to(dtype)
    assert all_finite(x)
    x.view(-1)[where] = bad
    assert not all_finite(x)
    assert not all_finite(x.transpose(1, 3))  # strided input too


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0, 3))
    assert all_finite(torch.randint(0, 255, (3, 4), dtype=torch.uint8))
    assert all_finite(torch.tensor(1e38).expand(100))  # large but finite (a sum would overflow)
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.complex64))

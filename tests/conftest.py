import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.fixture
def gen():
    """A fresh generator per test, seeded from the test's own RNG so inputs differ between runs of the suite."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    return g

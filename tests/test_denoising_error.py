"""denoising_error: chapter 4's per-level error of the predicted tau^0, on a small random network."""

from __future__ import annotations

import pytest
import torch

from diffusion_rl.diffusion import GaussianDiffusion, condition, denoising_error
from diffusion_rl.models import TemporalUnet, UNetConfig

A, O = 6, 17
D = A + O


def small(T: int = 10) -> GaussianDiffusion:
    torch.manual_seed(0)
    return GaussianDiffusion(TemporalUnet(UNetConfig(D, 8, dim=8, dim_mults=(1, 2))), A, T, "cosine").eval()


def test_denoising_error_matches_a_manual_computation():
    diffusion = small()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 8, D, generator=gen)
    noise = torch.randn(10, *x0.shape, generator=gen)
    err = denoising_error(diffusion, x0, noise)
    assert err.shape == (10, 8, D)
    assert torch.all(err >= 0)
    t = torch.full((5,), 3)
    with torch.no_grad():
        x_t = condition(diffusion.schedule.q_sample(x0, t, noise[3]), x0[:, 0, A:], A)
        want = ((diffusion.predict_x0(x_t, t) - x0) ** 2).mean(0)
    torch.testing.assert_close(err[3], want)


def test_denoising_error_refuses_noise_of_the_wrong_shape():
    diffusion = small()
    with pytest.raises(ValueError, match="expected"):
        denoising_error(diffusion, torch.zeros(2, 8, D), torch.zeros(2, 8, D))

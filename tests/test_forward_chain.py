"""forward_chain: the step-by-step forward process of chapter 3 agrees with the closed form q(tau^t | tau^0)."""

from __future__ import annotations

import pytest
import torch

from diffusion_rl.diffusion import NoiseSchedule, forward_chain


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_forward_chain_without_noise_scales_by_sqrt_alpha_bar(kind):
    s = NoiseSchedule(20, kind)
    x0 = torch.randn(3, 8, 23, generator=torch.Generator().manual_seed(0))
    chain = forward_chain(s, x0, torch.zeros(20, *x0.shape))
    assert chain.shape == (21, 3, 8, 23)
    assert torch.equal(chain[0], x0)
    for t in range(1, 21):
        torch.testing.assert_close(chain[t], s.sqrt_alpha_bar[t - 1] * x0, rtol=1e-4, atol=1e-6)


def test_forward_chain_has_the_closed_form_statistics():
    s = NoiseSchedule(20, "cosine")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(20_000, 4, generator=gen)  # unit variance, like normalized data
    chain = forward_chain(s, x0, torch.randn(20, *x0.shape, generator=gen))
    for t in range(1, 21):
        var = chain[t].var().item()
        corr = torch.corrcoef(torch.stack([chain[t].flatten(), x0.flatten()]))[0, 1].item()
        assert abs(var - 1) < 0.03
        assert abs(corr - s.sqrt_alpha_bar[t - 1].item()) < 0.02


def test_forward_chain_refuses_noise_of_the_wrong_shape():
    s = NoiseSchedule(10, "cosine")
    with pytest.raises(ValueError, match="expected"):
        forward_chain(s, torch.zeros(2, 8, 23), torch.zeros(9, 2, 8, 23))

"""The 2-D toy diffusion of chapter 3: it trains in seconds and its reverse chain finds every mode."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_rl import toy
from diffusion_rl.diffusion import NoiseSchedule


@pytest.fixture(scope="module")
def trained() -> toy.ToyDiffusion:
    return toy.train_toy(steps=1500, seed=0)


def test_density_integrates_to_one_and_matches_the_noised_mixture():
    data = toy.ToyData()
    g = torch.linspace(-5, 5, 401)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    cell = (g[1] - g[0]).item() ** 2
    for abar in (1.0, 0.5, 0.01):
        assert abs(toy.density(data, pts, abar).sum().item() * cell - 1) < 1e-3
    # At abar -> 0 the noised data is the standard normal the sampler starts from.
    origin = toy.density(data, torch.zeros(1, 2), 1e-9).item()
    assert abs(origin - 1 / (2 * math.pi)) < 1e-6


def test_posterior_mean_is_the_best_guess_and_not_linear():
    data = toy.ToyData()
    schedule = NoiseSchedule(20)
    gen = torch.Generator().manual_seed(0)
    x0 = data.sample(20_000, gen)
    for level in (2, 4, 6):  # where the modes still overlap little, the gap is large
        abar = float(schedule.alpha_bar[level])
        x_t = schedule.q_sample(x0, torch.full((len(x0),), level), torch.randn(x0.shape, generator=gen))
        exact = ((toy.posterior_mean(data, x_t, abar) - x0) ** 2).sum(1).mean()
        # The best *linear* guess for data of this covariance (chapter 4's baseline, corrected for the variance).
        var0 = x0.var(0).mean()
        linear = math.sqrt(abar) * var0 / (abar * var0 + 1 - abar) * x_t
        assert exact < 0.9 * ((linear - x0) ** 2).sum(1).mean()
        # Nudging the exact posterior mean in any direction makes it worse.
        assert exact < ((toy.posterior_mean(data, x_t, abar) * 1.05 - x0) ** 2).sum(1).mean()


def test_forward_chain_ends_in_standard_noise(trained):
    chain = toy.toy_forward(trained, 20_000, seed=1)
    assert chain.shape == (21, 20_000, 2)
    _, dist = trained.data.nearest_mode(chain[0])
    assert (dist < 5 * trained.data.std).all()  # P(> 5 std) = exp(-12.5) in 2-D
    assert chain[-1].mean(0).abs().max() < 0.05
    assert (chain[-1].var(0) - 1).abs().max() < 0.05


def test_training_is_fast_and_the_loss_falls(trained):
    assert trained.wall_time_s < 60, "the toy must train in seconds (allowing for a busy CI machine)"
    first, last = sum(trained.losses[:100]) / 100, sum(trained.losses[-100:]) / 100
    assert last < 0.8 * first


def test_reverse_chain_recovers_every_mode(trained):
    chain = toy.reverse_chain(trained, 4000, seed=2)
    assert chain.shape == (21, 4000, 2)
    idx, dist = trained.data.nearest_mode(chain[-1])
    assert (dist < 3 * trained.data.std).float().mean() > 0.85, "samples should sit on the modes"
    shares = torch.bincount(idx, minlength=len(trained.data.modes)).float() / len(idx)
    assert shares.min() > 0.12 and shares.max() < 0.30, f"every mode about 1/5 of the samples: {shares}"
    # The network's guess of x^0 is close to the exact posterior mean at a middle level.
    x_t = chain[10]
    level = trained.schedule.n_timesteps - 10
    guess = trained.predict_x0(x_t, torch.full((len(x_t),), level))
    exact = toy.posterior_mean(trained.data, x_t, float(trained.schedule.alpha_bar[level]))
    assert ((guess - exact) ** 2).sum(1).mean().sqrt() < 0.15


def test_reverse_chain_is_seeded_and_guidance_moves_it(trained):
    a = toy.reverse_chain(trained, 500, seed=3)
    assert torch.equal(a, toy.reverse_chain(trained, 500, seed=3))
    push = torch.tensor([1.0, 0.0])
    guided = toy.reverse_chain(trained, 500, seed=3, guide_grad=lambda x: push.expand_as(x), kappa=0.05)
    assert guided[-1][:, 0].mean() > a[-1][:, 0].mean() + 0.3


def test_plot_toy_step_draws_both_chains(trained):
    import matplotlib

    matplotlib.use("Agg")
    fwd, rev = toy.toy_forward(trained, 200), toy.reverse_chain(trained, 200)
    fig = toy.plot_toy_step(trained, fwd, rev, 7)
    assert len(fig.axes) == 2 and fig.get_figwidth() <= 7.5
    assert all(len(ax.collections) >= 2 for ax in fig.axes)  # contours and points
    import matplotlib.pyplot as plt

    plt.close(fig)  # later tests count the open figures

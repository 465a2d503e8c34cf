"""Forward noising, the U-Net, the loss and the conditioned samplers, on small random networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_rl.diffusion import GaussianDiffusion, Guide, NoiseSchedule, condition, make_betas
from diffusion_rl.models import TemporalUnet, UNetConfig, ValueNet

A, O = 6, 17
D = A + O


def small(horizon: int = 8, T: int = 10, predict_epsilon: bool = False) -> GaussianDiffusion:
    torch.manual_seed(0)
    return GaussianDiffusion(TemporalUnet(UNetConfig(D, horizon, dim=8, dim_mults=(1, 2))), A, T, "cosine", predict_epsilon)


class LinearValue(torch.nn.Module):
    """A value we can reason about: the sum of the first action dimension over the plan."""

    def forward(self, x, t):
        return x[:, :, 0].sum(1)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedules_go_from_data_to_noise(kind):
    s = NoiseSchedule(20, kind)
    abar = s.alpha_bar.double()
    assert torch.all(abar[1:] < abar[:-1]), "alpha-bar must fall monotonically"
    assert abar[0] > 0.9 and abar[-1] < 0.01
    snr = s.snr()
    assert torch.all(snr[1:] < snr[:-1])
    assert np.allclose(np.cumprod(1 - make_betas(kind, 20)), abar.numpy(), rtol=1e-5)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="cosine"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="positive"):
        make_betas("cosine", 0)


def test_q_sample_has_the_forward_marginal():
    s = NoiseSchedule(20)
    x0 = torch.full((20000, 1, 1), 2.0)
    for t_int in (0, 10, 19):
        t = torch.full((len(x0),), t_int)
        x = s.q_sample(x0, t, torch.randn_like(x0, generator=None))
        abar = s.alpha_bar[t_int].item()
        assert abs(x.mean().item() - 2 * math.sqrt(abar)) < 0.03
        assert abs(x.var().item() - (1 - abar)) < 0.03


def test_eps_and_x0_parameterizations_invert_each_other():
    s = NoiseSchedule(20)
    x0, eps = torch.randn(5, 8, D), torch.randn(5, 8, D)
    t = torch.tensor([0, 3, 7, 12, 19])
    x_t = s.q_sample(x0, t, eps)
    assert torch.allclose(s.x0_from_eps(x_t, t, eps), x0, atol=1e-3)
    assert torch.allclose(s.eps_from_x0(x_t, t, x0), eps, atol=1e-4)


def test_posterior_given_the_true_x0_is_tight_at_the_last_step():
    s = NoiseSchedule(20)
    x0 = torch.randn(3, 8, D)
    t = torch.zeros(3, dtype=torch.long)
    mean, log_var = s.q_posterior(x0, s.q_sample(x0, t, torch.randn_like(x0)), t)
    assert torch.allclose(mean, x0, atol=1e-5)  # posterior at t=0 is tau^0 itself


@pytest.mark.parametrize("horizon,mults", [(8, (1, 2, 4)), (32, (1, 2, 4, 8)), (4, (1,))])
def test_unet_and_value_shapes(horizon, mults):
    cfg = UNetConfig(D, horizon, dim=8, dim_mults=mults)
    x, t = torch.randn(3, horizon, D), torch.tensor([0, 5, 9])
    assert TemporalUnet(cfg)(x, t).shape == (3, horizon, D)
    assert ValueNet(cfg)(x, t).shape == (3,)


@pytest.mark.parametrize("horizon", [10, 6, 0])
def test_horizon_the_unet_cannot_halve_is_refused(horizon):
    with pytest.raises(ValueError, match="multiple of 4"):
        TemporalUnet(UNetConfig(D, horizon, dim=8, dim_mults=(1, 2, 4)))


def test_the_condition_is_given_not_learned():
    diff = small()
    x0, t, noise = torch.randn(4, 8, D), torch.randint(10, (4,)), torch.randn(4, 8, D)
    base = diff.loss(x0, t, noise)
    # Whatever the network says about the first state does not enter the loss ...
    orig = diff.model.forward
    diff.model.forward = lambda x, t: _with_first_state(orig(x, t), 1e3)
    assert torch.allclose(diff.loss(x0, t, noise), base)
    # ... while the first action weighs action_weight times more than another entry.
    diff.model.forward = lambda x, t: _bump(orig(x, t), (0, 0))
    d_first = diff.loss(x0, t, noise) - base
    diff.model.forward = lambda x, t: _bump(orig(x, t), (1, 0))
    d_other = diff.loss(x0, t, noise) - base
    assert d_first.item() > 5 * d_other.item() > 0


def _with_first_state(x, value):
    x = x.clone()
    x[:, 0, A:] = value
    return x


def _bump(x, where):
    x = x.clone()
    x[:, where[0], where[1]] += 3.0
    return x


def test_sampler_reimposes_the_state_at_every_step_and_returns_the_chain():
    diff = small()
    state = torch.randn(5, O)
    out = diff.sample(state, generator=torch.Generator().manual_seed(0), return_chain=True)
    assert out.trajectories.shape == (5, 8, D)
    assert out.chain.shape == (diff.n_timesteps + 1, 5, 8, D)
    assert torch.equal(out.chain[-1], out.trajectories)
    assert torch.all(out.chain[:, :, 0, A:] == state)


@pytest.mark.parametrize("ddim_steps", [None, 4])
def test_a_seed_gives_the_same_plans(ddim_steps):
    diff = small()
    state = torch.randn(3, O)
    a = diff.sample(state, generator=torch.Generator().manual_seed(1), ddim_steps=ddim_steps).trajectories
    b = diff.sample(state, generator=torch.Generator().manual_seed(1), ddim_steps=ddim_steps).trajectories
    c = diff.sample(state, generator=torch.Generator().manual_seed(2), ddim_steps=ddim_steps).trajectories
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_is_deterministic_given_its_starting_noise():
    diff = small()
    state = torch.randn(2, O)
    noise = diff.sample_noise(2, 4, torch.Generator().manual_seed(0))
    other = noise.clone()
    other[1:] = torch.randn_like(other[1:])
    a = diff.sample(state, noise=noise, ddim_steps=4).trajectories
    assert torch.equal(a, diff.sample(state, noise=other, ddim_steps=4).trajectories)
    with pytest.raises(ValueError, match="ddim_steps"):
        diff.sample(state, ddim_steps=11)


def test_zero_guidance_reproduces_the_unguided_sampler_exactly():
    diff = small()
    value = ValueNet(UNetConfig(D, 8, dim=8, dim_mults=(1, 2)))
    state = torch.randn(4, O)
    plain = diff.sample(state, generator=torch.Generator().manual_seed(3))
    zero = diff.sample(state, generator=torch.Generator().manual_seed(3), guide=Guide(value, scale=0.0, n_steps=2))
    assert torch.equal(plain.trajectories, zero.trajectories)
    assert zero.values is not None and zero.values.shape == (4,)


def test_guidance_raises_the_value_and_keeps_the_condition():
    diff = small()
    state = torch.randn(16, O)
    values = []
    for scale in (0.0, 0.05, 0.2):
        out = diff.sample(state, generator=torch.Generator().manual_seed(4), guide=Guide(LinearValue(), scale=scale))
        assert torch.all(out.trajectories[:, 0, A:] == state)
        values.append(out.values.mean().item())
    assert values[0] < values[1] < values[2]


def test_guidance_stops_in_the_last_steps_and_scales_by_variance():
    diff = small()
    state = torch.randn(4, O)
    g = torch.Generator
    plain = diff.sample(state, generator=g().manual_seed(5)).trajectories
    # t_stopgrad beyond the chain: guidance never acts.
    never = diff.sample(state, generator=g().manual_seed(5), guide=Guide(LinearValue(), 1.0, t_stopgrad=99)).trajectories
    assert torch.equal(plain, never)
    full = diff.sample(state, generator=g().manual_seed(5), guide=Guide(LinearValue(), 1.0)).values.mean()
    scaled = diff.sample(state, generator=g().manual_seed(5), guide=Guide(LinearValue(), 1.0, scale_by_variance=True)).values.mean()
    assert LinearValue()(plain, None).mean() < scaled < full


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_guidance_scale_is_refused(bad):
    with pytest.raises(ValueError, match="guidance scale"):
        Guide(LinearValue(), scale=bad)


def test_epsilon_prediction_also_samples():
    diff = small(predict_epsilon=True)
    out = diff.sample(torch.zeros(2, O), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.trajectories).all()


def test_condition_writes_only_the_first_state():
    x = torch.zeros(2, 8, D)
    condition(x, torch.ones(2, O), A)
    assert x.sum() == 2 * O and torch.all(x[:, 0, A:] == 1)


# ----------------------------------------------------------------------------- sampler levels and guidance placement


@pytest.mark.parametrize("T", [1, 2, 5, 20])
def test_every_ddim_level_list_starts_at_the_noisiest_level_and_ends_at_zero(T):
    diff = GaussianDiffusion(TemporalUnet(UNetConfig(D, 8, dim=8, dim_mults=(1, 2))), A, T)
    assert diff.levels() == list(range(T - 1, -1, -1))
    for S in range(1, T + 1):
        levels = diff.levels(S)
        assert len(levels) == S and levels[0] == T - 1, (S, levels)
        assert all(a > b for a, b in zip(levels, levels[1:])), levels
        # One step jumps from T - 1 straight to the clean plan; more steps visit level 0 last.
        assert levels[-1] == (T - 1 if S == 1 else 0), levels


class RecordingDenoiser(torch.nn.Module):
    """Predicts tau^0 = 0 and records the level it is told: DDIM then only rescales the noise,
    so the size of x reveals the level it is at."""

    def __init__(self, horizon: int = 8):
        super().__init__()
        self.cfg = UNetConfig(D, horizon, dim=8, dim_mults=(1, 2))
        self.seen: list[int] = []

    def forward(self, x, t):
        self.seen.append(int(t[0]))
        return torch.zeros_like(x)


class LevelCheckingValue(torch.nn.Module):
    """A value net that records (level it is asked about, level x is actually at)."""

    def __init__(self, schedule: NoiseSchedule, noise_rms: float):
        super().__init__()
        self.schedule, self.noise_rms, self.calls = schedule, noise_rms, []

    def forward(self, x, t):
        rms = x[:, 1:].pow(2).mean().sqrt().item()  # row 0 holds the condition, not noise
        sigma = self.schedule.sqrt_one_minus_alpha_bar
        ratio = rms / self.noise_rms * sigma[-1].item()  # the noise started at level T - 1
        actual = -1 if ratio < 1e-6 else int(torch.argmin((sigma - ratio).abs()))
        self.calls.append((int(t[0]), actual))
        return x.sum((1, 2)) * 0


def test_one_step_ddim_starts_from_pure_noise_at_the_top_level():
    denoiser = RecordingDenoiser()
    diff = GaussianDiffusion(denoiser, A, 20)
    diff.sample(torch.zeros(2, O), generator=torch.Generator().manual_seed(0), ddim_steps=1)
    assert denoiser.seen == [19]


@pytest.mark.parametrize("placement", ["after", "before"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 20])
def test_the_value_net_is_called_at_the_level_x_is_at(placement, steps):
    diff = GaussianDiffusion(RecordingDenoiser(), A, 20)
    noise = diff.sample_noise(64, steps, torch.Generator().manual_seed(1))
    value = LevelCheckingValue(diff.schedule, noise[0, :, 1:].pow(2).mean().sqrt().item())
    guide = Guide(value, scale=0.0, placement=placement)
    diff.sample(torch.zeros(64, O), noise=noise, guide=guide, ddim_steps=steps)
    guided_calls = value.calls[:-1]  # the last call scores the finished plan for Sample.values
    assert len(guided_calls) == steps
    for asked, actual in guided_calls:
        # A finished (clean) plan has no level of its own; it is scored as level 0.
        assert asked == max(actual, 0), (placement, steps, value.calls)
    levels = diff.levels(steps)
    expected = levels if placement == "before" else [*levels[1:], 0]
    assert [asked for asked, _ in guided_calls] == expected


def test_t_stopgrad_counts_sampler_steps_for_ddim_too():
    diff = GaussianDiffusion(RecordingDenoiser(), A, 20)
    noise = diff.sample_noise(8, 5, torch.Generator().manual_seed(2))
    value = LevelCheckingValue(diff.schedule, 1.0)
    diff.sample(torch.zeros(8, O), noise=noise, guide=Guide(value, 0.0, t_stopgrad=2), ddim_steps=5)
    assert len(value.calls) - 1 == 3, "5 DDIM steps, none guided in the last 2"


def test_before_placement_leaves_the_last_word_to_the_denoiser():
    torch.manual_seed(0)
    diff = GaussianDiffusion(TemporalUnet(UNetConfig(D, 8, dim=8, dim_mults=(1, 2))), A, 10, clip_denoised=1.0)
    state = torch.randn(8, O)
    g = torch.Generator

    def plan(placement):
        guide = Guide(LinearValue(), 5.0, placement=placement)
        return diff.sample(state, generator=g().manual_seed(6), guide=guide).trajectories

    # x0-prediction's last reverse step returns the (clipped) prediction itself: "before" ends on it,
    # "after" pushes the finished plan once more, out of the range the denoiser can produce.
    assert plan("before")[..., 0].abs().max() <= 1.0
    assert plan("after")[..., 0].max() > 1.5
    with pytest.raises(ValueError, match="placement"):
        Guide(LinearValue(), 0.1, placement="during")


def test_ddim_step_variance_is_the_posterior_across_the_jump():
    s = NoiseSchedule(20)
    for t in range(20):
        assert s.step_variance(t, t - 1) == pytest.approx(float(s.posterior_variance[t]), rel=1e-6)
    # Two one-step posteriors are not a two-level jump, but the jump's variance lies between 0 and the prior's.
    v = s.step_variance(14, 9)
    assert 0 < v < 1 - float(s.alpha_bar[9])
    assert s.step_variance(4, -1) == 0.0
    with pytest.raises(ValueError):
        s.step_variance(3, 5)


def test_epsilon_prediction_where_it_would_divide_by_almost_zero_is_refused():
    net = TemporalUnet(UNetConfig(D, 8, dim=8, dim_mults=(1, 2)))
    with pytest.raises(ValueError, match="sqrt\\(alpha_bar\\)"):
        GaussianDiffusion(net, A, 20, "linear", predict_epsilon=True)
    GaussianDiffusion(net, A, 20, "linear", predict_epsilon=False)  # x0-prediction never divides
    GaussianDiffusion(net, A, 20, "cosine", predict_epsilon=True)


def test_action_bounds_keep_every_planned_action_in_range():
    diff = small()
    state = torch.randn(8, O)
    low, high = torch.full((A,), -0.2), torch.full((A,), 0.3)
    for steps in (None, 3):
        free = diff.sample(state, generator=torch.Generator().manual_seed(7), ddim_steps=steps).trajectories
        bounded = diff.sample(state, generator=torch.Generator().manual_seed(7), ddim_steps=steps, action_bounds=(low, high)).trajectories
        assert (free[..., :A] > 0.3).any() or (free[..., :A] < -0.2).any()
        assert bounded[..., :A].min() >= -0.2 - 1e-6 and bounded[..., :A].max() <= 0.3 + 1e-6
        assert torch.equal(bounded[:, 0, A:], state)

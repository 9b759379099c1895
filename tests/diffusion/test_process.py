"""Diffusion math: schedules, q(x_t | x_0), targets, DDIM vs the DDPM posterior, flow = Euler, guidance."""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.recipes.diffusion.process import Process, cosine_betas, ddim_step, linear_betas, sample


def test_linear_schedule_endpoints_and_alpha_bar_product():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    p = Process("linear", "eps", 1000)
    running = 1.0
    for t in (0, 1, 10, 500, 999):
        # alpha_bar_t = prod_{s <= t} (1 - beta_s), computed independently with Python floats.
        running = math.prod(1 - b for b in betas[: t + 1].tolist())
        assert p.alpha_bars[t].item() == pytest.approx(running, rel=1e-12)


def test_cosine_schedule_matches_its_closed_form():
    T, s = 1000, 0.008
    p = Process("cosine", "eps", T)
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    for t in (0, 100, 500, 900):  # before the max_beta clip matters
        assert p.alpha_bars[t].item() == pytest.approx(f[t + 1] / f[0], rel=1e-9)
    assert cosine_betas(T).max().item() <= 0.999


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_matches_closed_form_moments_of_the_markov_chain(schedule):
    """Noise step by step with q(x_t | x_{t-1}); the marginal must be N(sqrt(ab) x0, (1 - ab) I)."""
    T = 200
    p = Process(schedule, "eps", T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-1.0, 0.3, 0.9]).repeat(40_000, 1).double()  # 40k draws per value
    x = x0.clone()
    for t in range(T // 2):
        beta = p.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.tensor(T // 2 - 1)
    ab = p.alpha_bars[t]
    # Standard error of the mean ~ 0.005, of the std ~ 0.0035: 0.02 is 4+ sigma.
    assert torch.allclose(x.mean(0), ab.sqrt() * x0[0], atol=0.02)
    assert torch.allclose(x.std(0), (1 - ab).sqrt().expand(3), atol=0.02)
    # And q_sample is exactly that closed form for a given eps.
    eps = torch.randn(3, generator=g, dtype=torch.float64)
    assert torch.allclose(p.q_sample(x0[0], t, eps), ab.sqrt() * x0[0] + (1 - ab).sqrt() * eps, atol=1e-12)


@pytest.mark.parametrize(
    ("schedule", "prediction"), [("linear", "eps"), ("cosine", "x0"), ("linear", "v"), ("flow", "v")]
)
def test_targets_invert_to_x0_and_eps(schedule, prediction):
    p = Process(schedule, prediction, 1000)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g).double(), torch.randn(4, 3, 8, 8, generator=g).double()
    t = torch.tensor([0.3, 0.7, 0.05, 0.95]) if p.is_flow else torch.tensor([0, 250, 600, 999])
    x_t = p.q_sample(x0, t, eps)
    x0_hat, eps_hat = p.split(p.target(x0, t, eps), x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)


def test_invalid_process_settings_are_rejected():
    with pytest.raises(ValueError, match="flow"):
        Process("flow", "eps")
    with pytest.raises(ValueError, match="model.schedule"):
        Process("sigmoid", "eps")
    with pytest.raises(ValueError, match="model.time_sampling: logit_normal is for the flow schedule"):
        Process("linear", "eps", time_sampling="logit_normal")
    with pytest.raises(ValueError, match="model.time_sampling: 'beta' is not allowed"):
        Process("flow", "v", time_sampling="beta")


def test_logit_normal_times_are_the_sigmoid_of_a_standard_normal():
    """SD3's training-time density: median 1/2, and P(t < sigmoid(-1)) = P(z < -1) = 0.1587."""
    p, uniform = Process("flow", "v", time_sampling="logit_normal"), Process("flow", "v")
    g = torch.Generator().manual_seed(0)
    t = torch.stack([p.sample_time(g) for _ in range(20_000)])
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.01
    assert abs((t < torch.sigmoid(torch.tensor(-1.0))).double().mean().item() - 0.1587) < 0.01
    u = torch.stack([uniform.sample_time(g) for _ in range(20_000)])
    assert abs((u < 0.2).double().mean().item() - 0.2) < 0.01  # the default stays uniform


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_eta1_single_step_is_the_ddpm_posterior(schedule):
    """DDIM with eta = 1 from t to t-1 draws from q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)."""
    p = Process(schedule, "eps", 1000)
    g = torch.Generator().manual_seed(2)
    for t in (1, 10, 400, 999):
        x0, eps, z = (torch.randn(2, 3, 4, 4, generator=g).double() for _ in range(3))
        x_t = p.q_sample(x0, torch.tensor(t), eps)
        (a_t, s_t), (a_s, s_s) = ((c.item() for c in p.coefficients(torch.tensor(u))) for u in (t, t - 1))
        ddim = ddim_step(x0, eps, a_t, s_t, a_s, s_s, 1.0, z)
        mean, var = p.posterior(x_t, x0, t)
        assert torch.allclose(ddim, mean + math.sqrt(var) * z, atol=1e-10), t


def _toy_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.4 * x + 0.001 * t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1)


def test_ddim_eta1_full_steps_equals_ddpm_ancestral_sampling():
    """The sampler with all T steps and eta = 1 equals a DDPM loop written from the posterior formula."""
    T = 40
    p = Process("linear", "eps", T)
    labels = torch.tensor([0, 1])
    got = sample(
        _toy_model,
        p,
        (2, 1, 3, 3),
        labels,
        sampler="ddim",
        steps=T,
        eta=1.0,
        clip_x0=False,
        generator=torch.Generator().manual_seed(5),
    )
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        eps_hat = _toy_model(x.float(), torch.full((2,), float(t)), labels).double()
        ab = p.alpha_bars[t].item()
        x0_hat = (x - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab)
        mean, var = p.posterior(x, x0_hat, t)
        x = mean + math.sqrt(var) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(got.double(), x, atol=1e-4, rtol=1e-4)
    ddpm = sample(
        _toy_model, p, (2, 1, 3, 3), labels, sampler="ddpm", clip_x0=False, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(ddpm, got)


def test_flow_ddim_eta0_is_euler_integration():
    p = Process("flow", "v")
    labels = torch.tensor([1, 0, 1])
    got = sample(
        _toy_model, p, (3, 2, 2, 2), labels, steps=8, clip_x0=False, generator=torch.Generator().manual_seed(3)
    )
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    times = torch.linspace(1, 0, 9, dtype=torch.float64)
    for t, s in zip(times[:-1], times[1:], strict=True):
        v = _toy_model(x.float(), torch.full((3,), t.item() * 1000), labels).double()
        x = x + (s - t) * v
    assert torch.allclose(got.double(), x, atol=1e-5)


def test_classifier_free_guidance_mixes_conditional_and_null_outputs():
    p = Process("flow", "v")
    seen = []

    def model(x, t, y):
        seen.append(y.clone())
        return _toy_model(x, t, y)

    w, null = 3.0, 5
    labels = torch.tensor([2, 3])
    guided = sample(
        model,
        p,
        (2, 1, 2, 2),
        labels,
        steps=1,
        guidance=w,
        null_label=null,
        clip_x0=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert seen[0].tolist() == [2, 3, null, null]  # one doubled batch: conditional then null
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((2,), 1000.0)
    cond, uncond = _toy_model(x.float(), t, labels), _toy_model(x.float(), t, torch.full((2,), null))
    assert torch.allclose(guided.double(), x - (uncond + w * (cond - uncond)).double(), atol=1e-5)
    with pytest.raises(ValueError, match="class-conditional"):
        sample(_toy_model, p, (1, 1, 2, 2), labels[:1], guidance=2.0, null_label=None)


def test_sampling_step_counts_are_checked():
    p = Process("linear", "eps", 100)
    with pytest.raises(ValueError, match="--steps"):
        p.timesteps(101)
    assert p.timesteps(5) == [99.0, 74.0, 50.0, 25.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="flow"):
        sample(_toy_model, Process("flow", "v"), (1, 1, 2, 2), torch.tensor([0]), sampler="ddpm")


@pytest.mark.parametrize(
    ("schedule", "prediction"), [("flow", "v"), ("linear", "eps"), ("cosine", "v"), ("linear", "x0")]
)
def test_samplers_recover_a_point_mass_with_the_exact_denoiser(schedule, prediction):
    """For data = one image x*, the ideal network output is known in closed form; DDIM must land on x*."""
    p = Process(schedule, prediction, 1000)
    target = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(9)) * 2 - 1

    def exact(x, t, y):
        time = t.double() / 1000 if p.is_flow else t.double()
        a, s = (c.view(-1, 1, 1, 1) for c in p.coefficients(time))
        eps = (x.double() - a * target.double()) / s
        return p.target(target.double().expand_as(x), time, eps).float()

    for steps in (5, 50):
        out = sample(exact, p, (2, 3, 4, 4), torch.zeros(2, dtype=torch.long), steps=steps, clip_x0=False)
        assert torch.allclose(out, target.expand(2, -1, -1, -1), atol=1e-5)

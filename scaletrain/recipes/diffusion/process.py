"""The diffusion process: noise schedules, forward noising, training targets and samplers.

One parametrization covers both families: x_t = a_t * x_0 + s_t * eps.
  - Variance-preserving DDPM (schedule "linear" or "cosine"): a_t = sqrt(alpha_bar_t),
    s_t = sqrt(1 - alpha_bar_t), t an integer step in [0, T).
  - Rectified flow (schedule "flow"): a_t = 1 - t, s_t = t, t continuous in [0, 1]; the
    network predicts the velocity v = eps - x_0.
Prediction targets for DDPM: "eps" (noise), "x0" (clean sample) or "v" (a_t eps - s_t x_0).

Samplers all go through `ddim_step` written in (a, s): DDPM ancestral sampling is DDIM with
eta = 1 on every step (checked in tests/diffusion/test_process.py against the closed-form
posterior), and DDIM with eta = 0 on a flow schedule is exactly Euler integration of the ODE.
Classifier-free guidance mixes the conditional and unconditional (null class) outputs.

Shape legend: B batch, C channels, H height, W width (x_BCHW); T number of training steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# The embedding sees flow time t in [0, 1] scaled to the same range as DDPM steps, so one
# timestep embedding (frequencies tuned for 0..1000) serves both.
FLOW_TIME_SCALE = 1000.0

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020), rescaled so any T keeps the same total noise."""
    scale = 1000.0 / num_steps
    return torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""

    def alpha_bar(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    ab = alpha_bar(steps)
    # Clipping keeps the last step from being a division by ~0 (alpha_bar(1) = 0).
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


@dataclass
class Process:
    """A noise schedule plus what the network predicts; all tensors float64 on the CPU."""

    schedule: str  # "linear" | "cosine" | "flow"
    prediction: str  # "eps" | "x0" | "v"
    num_steps: int = 1000
    time_sampling: str = "uniform"  # flow only: "uniform" or "logit_normal" training times

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "flow"):
            raise ValueError(f"model.schedule: {self.schedule!r} is not allowed; use linear, cosine or flow")
        if self.prediction not in ("eps", "x0", "v"):
            raise ValueError(f"model.prediction: {self.prediction!r} is not allowed; use eps, x0 or v")
        if self.schedule == "flow" and self.prediction != "v":
            raise ValueError("model.prediction: the flow schedule trains the velocity; use prediction=v")
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"model.time_sampling: {self.time_sampling!r} is not allowed; use uniform or logit_normal")
        if self.time_sampling != "uniform" and not self.is_flow:
            raise ValueError("model.time_sampling: logit_normal is for the flow schedule; DDPM samples uniformly")
        if self.num_steps < 2:
            raise ValueError(f"model.timesteps: {self.num_steps} is not allowed; use >= 2")
        if self.schedule != "flow":
            self.betas = linear_betas(self.num_steps) if self.schedule == "linear" else cosine_betas(self.num_steps)
            self.alpha_bars = torch.cumprod(1 - self.betas, dim=0)

    @property
    def is_flow(self) -> bool:
        return self.schedule == "flow"

    # -- coefficients --------------------------------------------------------------------------
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) with x_t = a_t x_0 + s_t eps. DDPM t is a step index; -1 means 'clean'."""
        if self.is_flow:
            t = t.double()
            return 1 - t, t
        t = t.long()
        ab = torch.where(t >= 0, self.alpha_bars[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        return ab.sqrt(), (1 - ab).sqrt()

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The value the network's timestep embedding sees (float32)."""
        return (t.double() * FLOW_TIME_SCALE if self.is_flow else t.double()).float()

    # -- training --------------------------------------------------------------------------------
    def sample_time(self, generator: torch.Generator) -> torch.Tensor:
        if self.is_flow and self.time_sampling == "logit_normal":
            # SD3's logit-normal times (Esser et al. 2024): most draws are mid-way, where the
            # image's layout is decided; t near 0 (almost clean) and 1 (pure noise) teach little.
            return torch.sigmoid(torch.randn((), generator=generator, dtype=torch.float64))
        if self.is_flow:
            return torch.rand((), generator=generator, dtype=torch.float64)
        return torch.randint(0, self.num_steps, (), generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Draw from q(x_t | x_0) = N(a_t x_0, s_t^2 I) with the given standard-normal noise."""
        a, s = (_bcast(c, x0) for c in self.coefficients(t))
        return (a * x0.double() + s * eps.double()).to(x0.dtype)

    def target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the network learns to output for (x_0, t, eps)."""
        if self.is_flow:
            return eps - x0
        if self.prediction == "eps":
            return eps.clone()
        if self.prediction == "x0":
            return x0.clone()
        a, s = (_bcast(c, x0) for c in self.coefficients(t))
        return (a * eps.double() - s * x0.double()).to(x0.dtype)

    def split(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output -> (x0_hat, eps_hat), in float64."""
        a, s = (_bcast(c, x_t) for c in self.coefficients(t))
        out, x_t = out.double(), x_t.double()
        if self.is_flow:  # v = eps - x0, x_t = (1 - t) x0 + t eps
            return x_t - s * out, x_t + a * out
        if self.prediction == "eps":
            return (x_t - s * out) / a, out
        if self.prediction == "x0":
            return out, (x_t - a * out) / s
        return a * x_t - s * out, s * x_t + a * out  # v, using a^2 + s^2 = 1

    # -- sampling --------------------------------------------------------------------------------
    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t: int) -> tuple[torch.Tensor, float]:
        """DDPM's q(x_{t-1} | x_t, x_0): (mean, variance) in the closed form of Ho et al. eq. 7."""
        if self.is_flow:
            raise ValueError("the DDPM posterior is defined for the linear/cosine schedules, not flow")
        beta, ab = self.betas[t].item(), self.alpha_bars[t].item()
        ab_prev = self.alpha_bars[t - 1].item() if t > 0 else 1.0
        coef_x0 = math.sqrt(ab_prev) * beta / (1 - ab)
        coef_xt = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        return coef_x0 * x0.double() + coef_xt * x_t.double(), beta * (1 - ab_prev) / (1 - ab)

    def timesteps(self, num: int) -> list[float]:
        """Descending sampling times, ending with the 'clean' time (-1 for DDPM, 0.0 for flow)."""
        if num < 1:
            raise ValueError(f"--steps: {num} is not allowed; use >= 1")
        if self.is_flow:
            return torch.linspace(1.0, 0.0, num + 1, dtype=torch.float64).tolist()
        if num > self.num_steps:
            raise ValueError(f"--steps: {num} exceeds the {self.num_steps} training timesteps")
        steps = torch.linspace(self.num_steps - 1, 0, num, dtype=torch.float64).round().long().tolist()
        return [float(v) for v in steps] + [-1.0]


def ddim_step(
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    a_t: float,
    s_t: float,
    a_s: float,
    s_s: float,
    eta: float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One DDIM step from time t to an earlier time s (Song et al. 2021, eq. 12, in (a, s) form).

    The stochastic part has variance c^2 = eta^2 * (s_s/s_t)^2 * (s_t^2 - (a_t/a_s)^2 s_s^2): the
    variance of the Gaussian posterior q(x_s | x_t, x_0) times eta^2, so eta = 1 is ancestral
    sampling and eta = 0 the deterministic ODE-like sampler.
    """
    c2 = 0.0
    if eta > 0 and s_t > 0 and a_s > 0:
        c2 = eta**2 * (s_s / s_t) ** 2 * max(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0)
    direction = math.sqrt(max(s_s**2 - c2, 0.0))
    return a_s * x0_hat + direction * eps_hat + math.sqrt(c2) * noise.double()


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    process: Process,
    shape: tuple[int, ...],
    labels: torch.Tensor,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    guidance: float = 1.0,
    null_label: int | None = None,
    clip_x0: bool = True,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Generate a batch x_BCHW (float32) by reverse diffusion.

    `model_fn(x_t, model_time, labels)` is the network. sampler "ddpm" = ancestral sampling on
    all T steps (ignores `steps` and `eta`); "ddim" = `steps` evenly spaced steps with `eta`.
    guidance > 1 applies classifier-free guidance against `null_label`. `generator` is one
    generator for the batch, or one per sample: then sample i's noise depends on its own
    generator only, so a set drawn in other batches or split across ranks is the same set.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"--sampler: {sampler!r} is not allowed; use ddpm or ddim")
    if sampler == "ddpm":
        if process.is_flow:
            raise ValueError("--sampler ddpm needs a linear/cosine schedule; flow models sample with ddim (Euler)")
        steps, eta = process.num_steps, 1.0
    if guidance != 1.0 and null_label is None:
        raise ValueError("--cfg: classifier-free guidance needs a class-conditional model (model.num_classes > 0)")
    generator = generator or torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator) and len(generator) != shape[0]:
        raise ValueError(f"sample: {len(generator)} generators for a batch of {shape[0]}")
    # Noise comes from CPU generators so the same seed gives the same images on any device.
    x = _randn(shape, generator)
    times = process.timesteps(steps)
    labels = labels.to(device)
    for t, s in zip(times[:-1], times[1:], strict=True):
        t_B = torch.full((shape[0],), t, dtype=torch.float64)
        out = _guided(model_fn, x.float().to(device), process.model_time(t_B).to(device), labels, guidance, null_label)
        x0_hat, eps_hat = process.split(out.cpu(), x, t_B)
        if clip_x0:
            # Clipping x0 and re-deriving eps keeps the pair consistent with x_t.
            x0_hat = x0_hat.clamp(-1, 1)
            a_t, s_t = (_bcast(c, x) for c in process.coefficients(t_B))
            eps_hat = (x - a_t * x0_hat) / s_t
        (a_t, s_t), (a_s, s_s) = (
            tuple(v.item() for v in process.coefficients(torch.tensor(u, dtype=torch.float64))) for u in (t, s)
        )
        noise = _randn(shape, generator)  # drawn every step: aligned streams
        x = ddim_step(x0_hat, eps_hat, a_t, s_t, a_s, s_s, eta, noise)
    return x.float()


def _randn(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float64) for g in generator])


def _guided(
    model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float, null_label: int | None
) -> torch.Tensor:
    if guidance == 1.0:
        return model_fn(x, t, labels)
    # One forward of the doubled batch: conditional half, then unconditional half.
    null = torch.full_like(labels, null_label)
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) or scalar coefficient, shaped to broadcast against like_B... ."""
    coef = coef.double()
    if coef.dim() == 0:
        return coef
    return coef.view(-1, *([1] * (like.dim() - 1)))

"""Discrete DDPM noise schedules (k-diffusion form) and ComfyUI's named schedulers.

A latent at noise level sigma is `x = x0 + sigma * eps` (the "k-diffusion" variable). The UNet was trained on
`x / sqrt(sigma^2 + 1)` at an integer timestep t in 0..999; `ModelSampling` converts between the two.

Scheduler names and arrays follow ComfyUI's KSampler (`normal`, `karras`, `exponential`, `sgm_uniform`, `simple`,
`ddim_uniform`, `beta`, `linear_quadratic`, `kl_optimal`). Each returns a SIGMAS tensor: float32, descending,
ending with 0 (see `get_sigmas` for `denoise`).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ParamError


@dataclass(frozen=True)
class Schedule:
    """A discrete DDPM training schedule: `timesteps` "scaled linear" betas from linear_start to linear_end
    (SD 1.x and 2.x: 1000, 0.00085, 0.012)."""
    timesteps: int
    linear_start: float
    linear_end: float

    def betas(self) -> torch.Tensor:
        """float64 [timesteps]: linspace(sqrt(start), sqrt(end))^2."""
        return torch.linspace(self.linear_start ** 0.5, self.linear_end ** 0.5, self.timesteps,
                              dtype=torch.float64) ** 2


PREDICTIONS = ("eps", "v")


class ModelSampling:
    """A family's training schedule with its prediction type ("eps" or "v"); `ModelFamily.model_sampling()`
    builds it. sigmas[t] = sqrt((1 - acp_t) / acp_t), ascending with t (SD 1.x: 0.0292 .. 14.61).

    zsnr: zero terminal SNR (Lin et al. 2023), applied as ComfyUI does to the float64 sigmas before the
    float32 tables are made: sqrt(alphas_bar) shifted so its last value is 0 and scaled so its first is
    unchanged; the last alphas_bar is then set to 4.8973451890853435e-08 so the largest sigma stays finite
    (about 4517).
    """

    def __init__(self, schedule: Schedule, prediction: str, zsnr: bool = False):
        if prediction not in PREDICTIONS:
            raise ParamError("prediction", f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.schedule, self.prediction, self.zsnr = schedule, prediction, bool(zsnr)
        acp = torch.cumprod(1.0 - schedule.betas(), dim=0)
        sigmas = ((1 - acp) / acp) ** 0.5  # float64, log taken before the cast (as ComfyUI does)
        if zsnr:
            sigmas = zero_terminal_snr(sigmas)
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()
        self._log_sigmas_by_device = {self.log_sigmas.device: self.log_sigmas}
        self.sigma_data = 1.0

    def __repr__(self) -> str:
        return f"ModelSampling({self.prediction}{', zsnr' if self.zsnr else ''}, {len(self.sigmas)} steps)"

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma, quantize=True):
        """sigma -> timestep in log-sigma space. quantize=True (ComfyUI) gives the nearest training step;
        quantize=False interpolates linearly between the two neighbouring log-sigmas (k-diffusion's default)."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self._log_sigmas_on(sigma.device)  # on sigma's device: no GPU sync on every UNet call
        log_sigma = sigma.detach().float().log()
        dists = log_sigma.reshape(1, -1) - log_sigmas[:, None]  # (1000, N)
        if quantize:
            t = dists.abs().argmin(dim=0).float()
        else:
            low = (dists >= 0).cumsum(dim=0).argmax(dim=0).clamp(max=len(self.sigmas) - 2)
            lo, hi = log_sigmas[low], log_sigmas[low + 1]
            w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
            t = (1 - w) * low + w * (low + 1)
        return t.reshape(sigma.shape)

    def _log_sigmas_on(self, device):
        """The log-sigma table on a device, copied there once."""
        if device not in self._log_sigmas_by_device:
            self._log_sigmas_by_device[device] = self.log_sigmas.to(device)
        return self._log_sigmas_by_device[device]

    def sigma(self, timestep):
        """timestep (fractional allowed) -> sigma, interpolating log-sigma."""
        timestep = torch.as_tensor(timestep)
        t = timestep.float().cpu().clamp(0, len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent):
        """Fraction of the way through sampling (0 = start, pure noise) -> sigma, as ComfyUI's start/end_percent."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    # --- the denoiser's algebra -------------------------------------------------------------------------
    def calculate_input(self, sigma, x):
        """What the UNet sees: x / sqrt(sigma^2 + sigma_data^2). sigma [B] or scalar."""
        sigma = _bcast(sigma, x)
        return x / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, x):
        """x0 from the UNet output: eps -> x - sigma * eps; v -> x * c_skip - v * c_out."""
        sigma = _bcast(sigma, x)
        if self.prediction == "eps":
            return x - model_output * sigma
        sd2 = self.sigma_data ** 2
        return x * sd2 / (sigma ** 2 + sd2) - model_output * sigma * self.sigma_data / (sigma ** 2 + sd2) ** 0.5

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        """Starting point: latent + noise * sigma, or noise * sqrt(1 + sigma^2) + latent at the model's max sigma."""
        sigma = _bcast(sigma, noise)
        scale = torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma
        return noise * scale + latent

    def is_max_denoise(self, sigmas):
        """ComfyUI's `max_denoise`: the schedule starts at (or above) the model's largest sigma."""
        s0, smax = float(sigmas[0]), float(self.sigma_max)
        return math.isclose(smax, s0, rel_tol=1e-05) or s0 > smax


def zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Sigmas rescaled to zero terminal SNR (the last alphas_bar clamped to 4.8973451890853435e-08)."""
    alphas_bar_sqrt = (1.0 / (sigmas * sigmas + 1.0)).sqrt()  # sqrt(alphas_bar), descending with t
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # last -> 0, first unchanged
    alphas_bar = alphas_bar_sqrt ** 2
    alphas_bar[-1] = 4.8973451890853435e-08
    return ((1.0 - alphas_bar) / alphas_bar) ** 0.5


def _bcast(sigma, x):
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    return sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1)) if sigma.ndim else sigma


class ModelDenoiser:
    """Wraps a network `model(x_in, t[B], **cond) -> eps | v` into `denoiser(x, sigma[B], **cond) -> x0`."""

    def __init__(self, model, model_sampling: ModelSampling):
        self.model = model
        self.model_sampling = model_sampling

    def __call__(self, x, sigma, **cond):
        ms = self.model_sampling
        t = ms.timestep(sigma).to(x.device, torch.float32)
        out = self.model(ms.calculate_input(sigma, x), t, **cond)
        return ms.calculate_denoised(sigma, out.to(x.dtype), x)


def schedule_buffers(schedule: Schedule) -> dict:
    """The 12 DDPM buffers the LDM class stores in single-file checkpoints (computed in float64, stored float32)."""
    betas = schedule.betas()
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, 0)
    acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
    posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
    buffers = {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": acp.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - acp).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - acp).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / acp).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / acp - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * acp_prev.sqrt() / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
    }
    return {k: v.to(torch.float32) for k, v in buffers.items()}


# --- schedulers (ComfyUI's published formulas) -----------------------------------------------------------
def _append_zero(s):
    return torch.cat([s, s.new_zeros([1])])


def simple_scheduler(ms, steps):
    stride = len(ms.sigmas) / steps
    return torch.FloatTensor([float(ms.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def ddim_uniform_scheduler(ms, steps):
    # training steps 1, 1 + k, 1 + 2k, ... (k = 1000 // steps), reversed, then 0
    stride = max(len(ms.sigmas) // steps, 1)
    sigs = [float(ms.sigmas[t]) for t in range(1, len(ms.sigmas), stride)]
    return torch.FloatTensor(sigs[::-1] + [0.0])


def normal_scheduler(ms, steps, sgm=False):
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)  # 999, 0
    if sgm:
        ts = torch.linspace(float(start), float(end), steps + 1)[:-1]
    else:
        ts = torch.linspace(float(start), float(end), steps)
    return torch.FloatTensor([float(ms.sigma(t)) for t in ts] + [0.0])


def karras_scheduler(ms, steps, rho=7.0):
    smin, smax = float(ms.sigma_min), float(ms.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    lo, hi = smin ** (1 / rho), smax ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_scheduler(ms, steps):
    smin, smax = float(ms.sigma_min), float(ms.sigma_max)
    return _append_zero(torch.linspace(math.log(smax), math.log(smin), steps).exp())


def beta_scheduler(ms, steps, alpha=0.6, beta=0.6):
    n = len(ms.sigmas) - 1
    ts = np.rint(np.array([beta_ppf(q, alpha, beta) for q in 1 - np.linspace(0, 1, steps, endpoint=False)]) * n)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.FloatTensor(sigs + [0.0])


def linear_quadratic_scheduler(ms, steps, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        q_steps = steps - linear_steps
        q_coef = diff / (linear_steps * q_steps ** 2)
        l_coef = threshold_noise / linear_steps - 2 * diff / (q_steps ** 2)
        const = q_coef * (linear_steps ** 2)
        quad = [q_coef * (i ** 2) + l_coef * i + const for i in range(linear_steps, steps)]
        sched = [1.0 - v for v in lin + quad + [1.0]]
    return torch.FloatTensor(sched) * ms.sigma_max


def kl_optimal_scheduler(ms, steps):
    smin, smax = float(ms.sigma_min), float(ms.sigma_max)
    idx = torch.arange(steps, dtype=torch.float).div_(max(steps - 1, 1))  # one step: sigma_max (ComfyUI: NaN)
    out = idx.new_zeros(steps + 1)
    out[:-1] = (idx * math.atan(smin) + (1 - idx) * math.atan(smax)).tan_()
    return out


SCHEDULERS = {
    "simple": simple_scheduler,
    "sgm_uniform": lambda ms, steps: normal_scheduler(ms, steps, sgm=True),
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
    "beta": beta_scheduler,
    "normal": normal_scheduler,
    "linear_quadratic": linear_quadratic_scheduler,
    "kl_optimal": kl_optimal_scheduler,
}
SCHEDULER_NAMES = list(SCHEDULERS)


def calculate_sigmas(name, model_sampling, steps, discard_penultimate=False):
    """The full schedule for `steps` steps. discard_penultimate (ComfyUI does it for dpm_2, dpm_2_ancestral,
    uni_pc): build steps + 1 and drop the second-to-last sigma."""
    check_scheduler(name)
    if discard_penultimate:
        s = SCHEDULERS[name](model_sampling, steps + 1)
        return torch.cat([s[:-2], s[-1:]])
    return SCHEDULERS[name](model_sampling, steps)


def get_sigmas(name, model_sampling, steps, denoise=1.0, discard_penultimate=False):
    """SIGMAS for (steps, denoise) with ComfyUI's semantics: for denoise < 1 the schedule is built for
    int(steps / denoise) steps and its last steps + 1 sigmas are kept; denoise 0 gives an empty tensor."""
    validate_steps(steps)
    denoise = validate_denoise(denoise)
    check_scheduler(name)
    if denoise > 0.9999:
        return calculate_sigmas(name, model_sampling, steps, discard_penultimate)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    full = calculate_sigmas(name, model_sampling, int(steps / denoise), discard_penultimate)
    return full[-(steps + 1):]


def check_scheduler(name):
    if name not in SCHEDULERS:
        raise ParamError("scheduler", f"unknown scheduler {name!r}; choose one of {SCHEDULER_NAMES}")


def validate_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ParamError("steps", f"steps must be an integer >= 1, got {steps!r}")


def validate_denoise(denoise):
    try:
        d = float(denoise)
    except (TypeError, ValueError):
        d = float("nan")
    if not (0.0 <= d <= 1.0):  # also refuses NaN
        raise ParamError("denoise", f"denoise must be a number in 0..1, got {denoise!r}")
    return d


def check_sigmas(sigmas, name="sigmas") -> torch.Tensor:
    """SIGMAS: a finite, descending 1-D tensor (float32 copy); ParamError(name) otherwise."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1:
        raise ParamError(name, f"expected SIGMAS (a 1-D tensor), got {getattr(sigmas, 'shape', type(sigmas).__name__)}")
    sigmas = sigmas.detach().to(torch.float32).clone()
    if len(sigmas) and (not torch.isfinite(sigmas).all() or (sigmas[1:] > sigmas[:-1]).any()):
        raise ParamError(name, "must be finite and descending")
    return sigmas


# --- the inverse of the regularized incomplete beta function (no scipy at runtime) -------------------------
def _betacf(a, b, x, iters=300, eps=1e-16):
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def beta_cdf(x, a, b):
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q, a, b):
    """Inverse of beta_cdf by bisection to float64 resolution."""
    q = float(q)
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == b and q == 0.5:  # exact by symmetry (ComfyUI's beta schedule rounds 0.5 * 999 = 499.5 up)
        return 0.5
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)

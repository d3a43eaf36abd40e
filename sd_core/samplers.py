"""Samplers as plain functions, with ComfyUI's names.

    sample_<name>(denoiser, x, sigmas, noise=None, callback=None, **options) -> x

- denoiser(x, sigma[B]) -> x0 (the denoised estimate), in the k-diffusion variable x = x0 + sigma * eps.
- x is the noisy start at sigmas[0] (already scaled); sigmas descend, usually to 0.
- noise(sigma, sigma_next) -> Tensor like x: the only random source. Samplers that need it (ancestral, SDE, ddpm,
  lcm) refuse to run without one; they never call torch.randn themselves.
- callback(step, x, denoised) after each step's first model call (previews, progress; raise to cancel).

Each function is written from the published method and tested (tests/test_sampling_samplers.py) against:
k-diffusion 0.1.1 (euler, euler_ancestral, heun, dpm_2, dpm_2_ancestral, lms, dpmpp_2s_ancestral, dpmpp_sde,
dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde) and diffusers' schedulers (ddim: DDIMScheduler; ddpm: DDPMScheduler;
lcm: LCMScheduler; uni_pc: UniPCMultistepScheduler). ComfyUI's `ddim` is Euler (plus fresh inpainting noise,
handled in sampling.py): Euler on the k-diffusion variable is exactly deterministic DDIM.
"""
import functools
from collections import deque

import torch

# samplers whose ComfyUI schedule is built for steps + 1 with the penultimate sigma dropped
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
# samplers that use step noise, and those that draw it from a Brownian tree (cpu tree / device tree)
ANCESTRAL_SAMPLERS = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "ddpm", "lcm"}
SDE_SAMPLERS = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2m_sde_heun"}
SDE_GPU_SAMPLERS = {n + "_gpu" for n in SDE_SAMPLERS}
# samplers whose inpainting blend uses fresh noise (seed + 1 on the CPU) rather than the starting noise
INPAINT_RANDOM_NOISE_SAMPLERS = {"ddim"}


def _s_in(x):
    return x.new_ones([x.shape[0]])


# No host synchronisation inside the loops (issue #14): on CUDA every Python-level read of a device tensor
# (`if sigmas[i + 1] == 0`, float(t), min(t, u), ...) waits for the GPU queue to drain. Whatever a loop branches
# on is read from the schedule once, before the loop (`_host`); arithmetic stays on the device tensors, so
# the results are bitwise those of before.
def _host(sigmas):
    """The schedule as Python floats (one read, before the loop; free when the caller passes CPU sigmas)."""
    return sigmas.detach().cpu().tolist()


def _at(x, sigma, value=None):
    """The per-latent noise level batch [B] the denoiser takes; `value`, the same level as a Python float when
    the sampler knows it, rides along as `glass_sigma` so guidance can test step ranges without reading it."""
    s = sigma * _s_in(x)
    if value is not None:
        s.glass_sigma = value
    return s


def _host_each(fn, *columns):
    """fn applied step by step to 0-dim CPU tensors of the schedule, as floats: the host values of the noise
    levels a loop computes on the device between schedule points (the same scalar float32 operations), read
    before the loop."""
    return [float(fn(*(c[i] for c in columns))) for i in range(len(columns[0]))]


def sigma_value(sigma) -> float:
    """The noise level of a denoiser's sigma batch as a Python float: the sampler's host value when it gave
    one, else a read of the tensor (a host sync on a GPU)."""
    value = getattr(sigma, "glass_sigma", None)
    return float(sigma.reshape(-1)[0]) if value is None else value


def _to_d(x, sigma, denoised):
    """ODE slope dx/dsigma = (x - x0) / sigma."""
    return (x - denoised) / sigma


def _need(noise, name):
    if noise is None:
        raise ValueError(f"sampler {name!r} needs an explicit noise source noise(sigma, sigma_next)")


def _ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split sigma_from -> sigma_to into a deterministic step to sigma_down plus fresh noise of std sigma_up."""
    if not eta:
        return sigma_to, 0.0
    up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    down = (sigma_to ** 2 - up ** 2) ** 0.5
    return down, up


def _ancestral_steps(sigmas, eta):
    """_ancestral_step for every step of the schedule at once, on its CPU copy (the same float32 operations, so
    the same values): (down, up) as tensors on the schedule's device [steps] and as Python floats."""
    cpu = sigmas.detach().cpu()
    if not eta:
        down, up = cpu[1:], torch.zeros_like(cpu[1:])
    else:
        down, up = _ancestral_step(cpu[:-1], cpu[1:], eta)
    return down.to(sigmas.device), up.to(sigmas.device), down.tolist(), up.tolist()


def _cb(callback, i, x, denoised):
    if callback is not None:
        callback(i, x, denoised)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, noise=None, callback=None):
    fs = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        _cb(callback, i, x, denoised)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0):
    if eta and s_noise:
        _need(noise, "euler_ancestral")
    fs = _host(sigmas)
    downs, ups, fdowns, fups = _ancestral_steps(sigmas, eta)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        _cb(callback, i, x, denoised)
        if fdowns[i] == 0:
            x = denoised
        else:
            x = x + _to_d(x, sigmas[i], denoised) * (downs[i] - sigmas[i])
            if fups[i] > 0 and s_noise:
                x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * ups[i]
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, noise=None, callback=None):
    fs = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        d = _to_d(x, sigmas[i], denoised)
        _cb(callback, i, x, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if fs[i + 1] == 0:
            x = x + d * dt
        else:  # trapezoid: average the slopes at both ends
            x2 = x + d * dt
            d2 = _to_d(x2, sigmas[i + 1], denoiser(x2, _at(x, sigmas[i + 1], fs[i + 1])))
            x = x + (d + d2) / 2 * dt
    return x


def _log_midpoint(sigma, sigma_to):
    return sigma.log().lerp(sigma_to.log(), 0.5).exp()


def _dpm2_midpoint(denoiser, x, d, sigma, sigma_to, mid_value=None):
    """DPM-Solver-2 step from sigma to sigma_to through the log-space midpoint (mid_value: its host value)."""
    mid = _log_midpoint(sigma, sigma_to)
    x2 = x + d * (mid - sigma)
    d2 = _to_d(x2, mid, denoiser(x2, _at(x, mid, mid_value)))
    return x + d2 * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, noise=None, callback=None):
    fs = _host(sigmas)
    cpu = sigmas.detach().cpu()
    mids = _host_each(_log_midpoint, cpu[:-1], cpu[1:])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        d = _to_d(x, sigmas[i], denoised)
        _cb(callback, i, x, denoised)
        if fs[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = _dpm2_midpoint(denoiser, x, d, sigmas[i], sigmas[i + 1], mids[i])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0):
    if eta and s_noise:
        _need(noise, "dpm_2_ancestral")
    fs = _host(sigmas)
    downs, ups, fdowns, fups = _ancestral_steps(sigmas, eta)
    mids = _host_each(_log_midpoint, sigmas.detach().cpu()[:-1], downs.cpu())
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        _cb(callback, i, x, denoised)
        d = _to_d(x, sigmas[i], denoised)
        if fdowns[i] == 0:
            x = x + d * (downs[i] - sigmas[i])
        else:
            x = _dpm2_midpoint(denoiser, x, d, sigmas[i], downs[i], mids[i])
            if fups[i] > 0 and s_noise:
                x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * ups[i]
    return x


def _lms_coeff(order, t, i, j, nodes=64):
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial for node t[i-j] (Gauss-Legendre, exact for
    these polynomials of degree < 4)."""
    xs, ws = _gauss_legendre(nodes)
    a, b = float(t[i]), float(t[i + 1])
    total = 0.0
    for xg, wg in zip(xs, ws):
        tau = 0.5 * (b - a) * xg + 0.5 * (b + a)
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - float(t[i - k])) / (float(t[i - j]) - float(t[i - k]))
        total += wg * prod
    return 0.5 * (b - a) * total


@functools.lru_cache(maxsize=None)
def _gauss_legendre(n):
    import numpy as np

    return np.polynomial.legendre.leggauss(n)  # (thread-safe cache: no module-level dict to share)


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, noise=None, callback=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma) on the last `order` slopes."""
    sig = sigmas.detach().cpu().double().numpy()
    fs = _host(sigmas)
    ds = deque(maxlen=order)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        ds.append(_to_d(x, sigmas[i], denoised))
        _cb(callback, i, x, denoised)
        if fs[i + 1] == 0:
            x = denoised
        else:
            cur = min(i + 1, order)
            coeffs = [_lms_coeff(cur, sig, i, j) for j in range(cur)]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def _log_snr_midpoint(sigma, sigma_to):
    lam = -sigma.log()
    return (-(lam + 0.5 * (-sigma_to.log() - lam))).exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) steps to sigma_down, then ancestral noise."""
    if eta and s_noise:
        _need(noise, "dpmpp_2s_ancestral")
    fs = _host(sigmas)
    downs, ups, fdowns, fups = _ancestral_steps(sigmas, eta)
    mids = _host_each(_log_snr_midpoint, sigmas.detach().cpu()[:-1], downs.cpu())
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        down, up = downs[i], ups[i]
        _cb(callback, i, x, denoised)
        if fdowns[i] == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:
            lam, lam_next = -sigmas[i].log(), -down.log()
            h = lam_next - lam
            sigma_s = _log_snr_midpoint(sigmas[i], down)
            x2 = (sigma_s / sigmas[i]) * x - (-0.5 * h).expm1() * denoised
            denoised2 = denoiser(x2, _at(x, sigma_s, mids[i]))
            x = (down / sigmas[i]) * x - (-h).expm1() * denoised2
        if fs[i + 1] > 0 and fups[i] > 0 and s_noise:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, single step of two stages, intermediate at log-SNR fraction r)."""
    if len(sigmas) <= 1:
        return x
    if eta and s_noise:
        _need(noise, "dpmpp_sde")
    fs = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        _cb(callback, i, x, denoised)
        if fs[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = -sigmas[i].log(), -sigmas[i + 1].log()
        h = lam_t - lam_s
        lam_s1 = lam_s + r * h
        sigma_s1 = (-lam_s1).exp()
        fac = 1 / (2 * r)
        # stage 1: to sigma_s1 (ancestral split)
        down, up = _ancestral_step(sigmas[i], sigma_s1, eta)
        h_ = -torch.as_tensor(down).log() - lam_s
        x2 = (-h_).exp() * x - (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x2 = x2 + noise(sigmas[i], sigma_s1) * s_noise * up
        denoised2 = denoiser(x2, sigma_s1 * _s_in(x))
        # stage 2: to sigmas[i + 1] with the blended estimate
        down, up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        h_ = -torch.as_tensor(down).log() - lam_s
        blend = (1 - fac) * denoised + fac * denoised2
        x = (-h_).exp() * x - (-h_).expm1() * blend
        if eta > 0 and s_noise > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, noise=None, callback=None):
    """DPM-Solver++(2M): second order from the previous step's x0 estimate."""
    old = None
    fs = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        _cb(callback, i, x, denoised)
        lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = lam_next - lam
        if old is None or fs[i + 1] == 0:
            est = denoised
        else:
            r = (lam - (-sigmas[i - 1].log())) / h
            est = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * est
        old = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE; solver_type 'midpoint' (ComfyUI default) or 'heun'."""
    if len(sigmas) <= 1:
        return x
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    if eta and s_noise:
        _need(noise, "dpmpp_2m_sde")
    old, h_last, h = None, None, None
    fs = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        _cb(callback, i, x, denoised)
        if fs[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()  # log-SNR step
            h_eta = h * (eta + 1)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + (-h_eta).expm1().neg() * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + 0.5 * (-h_eta).expm1().neg() * (1 / r) * (denoised - old)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0):
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, noise, callback, eta=eta, s_noise=s_noise, solver_type="heun")


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, noise=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third order from the two previous x0 estimates."""
    if len(sigmas) <= 1:
        return x
    if eta and s_noise:
        _need(noise, "dpmpp_3m_sde")
    d1_prev, d2_prev = None, None  # x0 estimates one and two steps back
    h, h1, h2 = None, None, None
    fs = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        _cb(callback, i, x, denoised)
        if fs[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + (-h_eta).expm1().neg() * denoised
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                d1_0 = (denoised - d1_prev) / r0
                d1_1 = (d1_prev - d2_prev) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h1 is not None:
                d = (denoised - d1_prev) / (h1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        d1_prev, d2_prev = denoised, d1_prev
        h1, h2 = h, h1
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, noise=None, callback=None):
    """ComfyUI's `ddim`: Euler steps (= deterministic DDIM, eta 0, on the k-diffusion variable)."""
    return sample_euler(denoiser, x, sigmas, noise, callback)


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, noise=None, callback=None):
    """Ancestral DDPM posterior steps (variance "fixed small") between the given noise levels."""
    _need(noise, "ddpm")
    fs = _host(sigmas)
    for i in range(len(sigmas) - 1):
        s, s_prev = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _at(x, s, fs[i]))
        _cb(callback, i, x, denoised)
        eps = (x - denoised) / s
        xv = x / torch.sqrt(1.0 + s ** 2.0)  # the variance-preserving variable
        acp, acp_prev = 1 / (s * s + 1), 1 / (s_prev * s_prev + 1)
        alpha = acp / acp_prev
        mu = (1.0 / alpha).sqrt() * (xv - (1 - alpha) * eps / (1 - acp).sqrt())
        if fs[i + 1] > 0:
            mu = mu + ((1 - alpha) * (1.0 - acp_prev) / (1.0 - acp)).sqrt() * noise(s, s_prev)
            x = mu * torch.sqrt(1.0 + s_prev ** 2.0)
        else:
            x = mu
    return x


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, noise=None, callback=None):
    """Latent-consistency sampling: jump to x0, then re-noise to the next level with fresh noise."""
    _need(noise, "lcm")
    fs = _host(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _at(x, sigmas[i], fs[i]))
        _cb(callback, i, x, denoised)
        x = denoised
        if fs[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x


# --- UniPC (Zhao et al. 2023), multistep, data prediction, B(h) = h (bh1) or expm1(h) (bh2) -------------------
def _unipc_update(denoiser, x, models, lams, sigma_prev, sigma_t, order, variant, use_corrector, value_t=None):
    """One UniPC step from the newest stored point (sigma_prev) to sigma_t (value_t: the same as a float), in the
    k-diffusion variable. models / lams: x0 estimates and log-SNRs of the stored points, oldest first.
    Returns (x_t, model_t). The small systems are solved with linalg.solve_ex: linalg.solve reads its error
    flag on the host after every solve (a GPU sync), and these Vandermonde systems are never singular."""
    lam_t = -sigma_t.log()
    m0, lam0 = models[-1], lams[-1]
    h = lam_t - lam0
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[-(k + 1)] - lam0) / h
        rks.append(rk)
        d1s.append((models[-(k + 1)] - m0) / rk)
    rks.append(torch.ones_like(h))
    rks = torch.stack(rks)
    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    R, b, fact = [], [], 1
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = torch.stack(R), torch.stack(b)
    x_base = (sigma_t / sigma_prev) * x - h_phi_1 * m0
    if d1s:
        rhos_p = torch.tensor([0.5], dtype=b.dtype) if order == 2 else torch.linalg.solve_ex(R[:-1, :-1], b[:-1])[0]
        pred = sum(rho * d for rho, d in zip(rhos_p.to(x.dtype), d1s))
    else:
        pred = 0
    x_t = x_base - b_h * pred
    model_t = None
    if use_corrector:
        rhos_c = torch.tensor([0.5], dtype=b.dtype) if order == 1 else torch.linalg.solve_ex(R, b)[0]
        rhos_c = rhos_c.to(x.dtype)
        model_t = denoiser(x_t, _at(x, sigma_t, value_t))
        corr = sum(rho * d for rho, d in zip(rhos_c[:-1], d1s)) if d1s else 0
        x_t = x_base - b_h * (corr + rhos_c[-1] * (model_t - m0))
    return x_t, model_t


@torch.no_grad()
def sample_uni_pc(denoiser, x, sigmas, noise=None, callback=None, variant="bh1", final_sigma=0.001):
    """UniPC-p multistep with corrector (order min(3, steps - 1), lower order at the end), as ComfyUI runs it:
    a final sigma of 0 is replaced by `final_sigma`, so the result keeps that much noise; no corrector on the
    last step; the first call only evaluates the model.

    Log-SNR is -log(sigma) here. ComfyUI derives it in float32 through log(1 - alpha^2), which loses digits at
    sigma 0.001, so its result differs from this (and from diffusers') by a few 1e-5 in the latent."""
    host = sigmas.detach().cpu().clone()
    if host[-1] == 0:
        host[-1] = final_sigma
    sigmas, fs = host.to(sigmas.device), host.tolist()
    steps = len(sigmas) - 1
    order = min(3, len(sigmas) - 2)
    models, lams, sig_hist = deque(maxlen=max(order, 1)), deque(maxlen=max(order, 1)), deque(maxlen=max(order, 1))
    for i in range(steps):
        if i == 0:
            models.append(denoiser(x, _at(x, sigmas[0], fs[0])))
            lams.append(-sigmas[0].log())
            sig_hist.append(sigmas[0])
        else:
            last = [i, i + 1] if (i >= order and i == steps - 1) else [i]
            for step in last:
                step_order = i if i < order else min(order, steps + 1 - step)
                use_corr = step != steps
                x, model_x = _unipc_update(denoiser, x, list(models), list(lams), sig_hist[-1], sigmas[step],
                                           step_order, variant, use_corr, fs[step])
                if step == steps:  # the final point's x0 is never needed
                    break
                if model_x is None:
                    model_x = denoiser(x, _at(x, sigmas[step], fs[step]))
                models.append(model_x)
                lams.append(-sigmas[step].log())
                sig_hist.append(sigmas[step])
        _cb(callback, i, x, models[-1])
    return x


@torch.no_grad()
def sample_uni_pc_bh2(denoiser, x, sigmas, noise=None, callback=None):
    return sample_uni_pc(denoiser, x, sigmas, noise, callback, variant="bh2")


def _gpu_alias(fn):
    def f(denoiser, x, sigmas, noise=None, callback=None, **options):
        return fn(denoiser, x, sigmas, noise, callback, **options)
    f.__doc__ = f"{fn.__name__} with a Brownian tree built on x's device (ComfyUI's *_gpu names)."
    return f


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": _gpu_alias(sample_dpmpp_sde),
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": _gpu_alias(sample_dpmpp_2m_sde),
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": _gpu_alias(sample_dpmpp_2m_sde_heun),
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": _gpu_alias(sample_dpmpp_3m_sde),
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ddim": sample_ddim,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
SAMPLER_NAMES = list(SAMPLERS)
# the names that draw noise from a Brownian tree, with whether the tree lives on the CPU
BROWNIAN_SAMPLERS = {**{n: True for n in SDE_SAMPLERS}, **{n: False for n in SDE_GPU_SAMPLERS}}


def get_sampler(name):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLER_NAMES}")
    return SAMPLERS[name]


def needs_noise(name):
    return name in ANCESTRAL_SAMPLERS or name in BROWNIAN_SAMPLERS

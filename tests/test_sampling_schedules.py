"""The SD 1.x schedule and every ComfyUI scheduler's SIGMAS over a grid of (steps, denoise).

Expected arrays are written here from ComfyUI's published formulas (comfy/samplers.py, in float64 numpy), with
k-diffusion's get_sigmas_karras / get_sigmas_exponential and scipy's beta.ppf as references where they apply.
"""
import math

import numpy as np
import pytest
import torch

import _kdiff
from glass_diffusion.sd_core.family import SD1
from glass_diffusion.sd_core.schedules import (SCHEDULER_NAMES, beta_ppf, get_sigmas)

MS = SD1.model_sampling()
STEPS = [1, 2, 3, 4, 7, 10, 20, 25, 50]
DENOISE = [1.0, 0.9, 0.75, 0.5, 0.33, 0.1]


def _train_sigmas():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1 - betas)
    return np.sqrt((1 - acp) / acp)


SIG = _train_sigmas()
LOG = np.log(SIG)


def _sigma_at(t):  # log-sigma interpolation at fractional timestep t
    lo, hi = int(math.floor(t)), int(math.ceil(t))
    w = t - lo
    return math.exp((1 - w) * LOG[lo] + w * LOG[hi])


def expected(name, n):
    if name == "normal":
        return [_sigma_at(t) for t in np.linspace(999, 0, n)] + [0.0]
    if name == "sgm_uniform":
        return [_sigma_at(t) for t in np.linspace(999, 0, n + 1)[:-1]] + [0.0]
    if name == "simple":
        return [SIG[999 - int(i * 1000 / n)] for i in range(n)] + [0.0]
    if name == "ddim_uniform":
        return [SIG[t] for t in range(1, 1000, max(1000 // n, 1))][::-1] + [0.0]
    if name == "karras":
        return _kdiff.load().get_sigmas_karras(n, float(MS.sigma_min), float(MS.sigma_max)).tolist()
    if name == "exponential":
        return _kdiff.load().get_sigmas_exponential(n, float(MS.sigma_min), float(MS.sigma_max)).tolist()
    if name == "beta":
        from scipy.stats import beta

        ts = np.rint(beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 999)
        out = [SIG[int(t)] for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
        return out + [0.0]
    if name == "linear_quadratic":
        if n == 1:
            s = [1.0, 0.0]
        else:
            ls = n // 2
            q = n - ls
            diff = ls - 0.025 * n
            qc = diff / (ls * q ** 2)
            lc = 0.025 / ls - 2 * diff / q ** 2
            s = [i * 0.025 / ls for i in range(ls)] + [qc * i * i + lc * i + qc * ls * ls for i in range(ls, n)] + [1.0]
            s = [1 - v for v in s]
        return [v * SIG[-1] for v in s]
    if name == "kl_optimal":
        i = np.arange(n) / (n - 1) if n > 1 else np.array([0.0])  # ComfyUI divides by n - 1 = 0 (NaN)
        return list(np.tan(i * math.atan(SIG[0]) + (1 - i) * math.atan(SIG[-1]))) + [0.0]
    raise KeyError(name)


def test_training_sigmas_match_formula_and_diffusers():
    from diffusers import DDPMScheduler

    assert len(MS.sigmas) == 1000
    np.testing.assert_allclose(MS.sigmas.numpy(), SIG, rtol=1e-6)
    acp = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    np.testing.assert_allclose(MS.sigmas.numpy(), ((1 - acp) / acp).sqrt().numpy(), rtol=5e-5)  # diffusers: float32
    assert abs(float(MS.sigma_min) - 0.0292) < 1e-4 and abs(float(MS.sigma_max) - 14.6146) < 1e-3


def test_timestep_sigma_roundtrip():
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    assert torch.equal(MS.timestep(MS.sigma(t)), t)  # quantized (ComfyUI) inverse
    frac = torch.tensor([0.25, 10.5, 498.7, 998.9])
    np.testing.assert_allclose(MS.timestep(MS.sigma(frac), quantize=False).numpy(), frac.numpy(), atol=2e-3)
    # nearest step in log space, not in sigma space
    s = torch.tensor(math.exp(0.5 * (LOG[500] + LOG[501])) * 1.0001)
    assert float(MS.timestep(s)) == 501.0
    assert MS.percent_to_sigma(0.0) > 1e8 and MS.percent_to_sigma(1.0) == 0.0
    assert math.isclose(MS.percent_to_sigma(0.5), _sigma_at(499.5), rel_tol=1e-5)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_scheduler_grid(name):
    worst = 0.0
    for steps in STEPS:
        for denoise in DENOISE:
            got = get_sigmas(name, MS, steps, denoise)
            assert got.dtype == torch.float32
            full = expected(name, steps if denoise > 0.9999 else int(steps / denoise))
            exp = np.asarray(full if denoise > 0.9999 else full[-(steps + 1):], dtype=np.float64)
            assert got.shape == exp.shape, (name, steps, denoise)
            np.testing.assert_allclose(got.numpy(), exp, rtol=2e-6, atol=1e-7, err_msg=f"{name} {steps} {denoise}")
            worst = max(worst, float(np.max(np.abs(got.numpy() - exp) / np.maximum(exp, 1e-3))))
            assert got[-1] == 0 or name == "beta" and denoise < 1
    assert worst < 2e-6


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_one_step_schedule_is_finite(name):
    for discard in (False, True):
        got = get_sigmas(name, MS, 1, discard_penultimate=discard)
        assert len(got) == 2 and torch.isfinite(got).all() and got[0] > 0 and got[1] == 0, (name, got)


def test_discard_penultimate_and_denoise_zero():
    full = get_sigmas("karras", MS, 11)
    got = get_sigmas("karras", MS, 10, discard_penultimate=True)
    assert torch.equal(got, torch.cat([full[:-2], full[-1:]]))
    assert len(get_sigmas("normal", MS, 10, 0.0)) == 0


def test_beta_ppf_against_scipy():
    from scipy.stats import beta

    for q in [1e-9, 0.001, 0.1, 0.3333, 0.5, 0.77, 0.999, 1 - 1e-9]:
        for a, b in [(0.6, 0.6), (0.5, 0.7), (2.0, 3.0)]:
            assert abs(beta_ppf(q, a, b) - beta.ppf(q, a, b)) < 1e-10


@pytest.mark.parametrize("kw", [dict(steps=0), dict(steps=-3), dict(steps=2.5), dict(denoise=-0.1),
                                dict(denoise=1.01), dict(denoise=float("nan")), dict(name="nope")])
def test_bad_values_refused(kw):
    args = dict(name="normal", steps=10, denoise=1.0)
    args.update(kw)
    with pytest.raises(ValueError):
        get_sigmas(args["name"], MS, args["steps"], args["denoise"])


def test_timestep_lookup_stays_on_the_sigmas_device():
    """sigma -> timestep runs where sigma is (no host round trip per UNet call); the table is copied once."""
    ms = SD1.model_sampling()
    sigma = torch.tensor([14.6146, 1.0, 0.0292], device="meta")
    t = ms.timestep(sigma)
    assert t.device.type == "meta" and t.shape == sigma.shape
    assert ms._log_sigmas_on(torch.device("meta")) is ms._log_sigmas_on(torch.device("meta"))
    cpu = ms.timestep(torch.tensor([14.6146, 1.0, 0.0292]))
    assert cpu.tolist() == [999.0, float(ms.timestep(torch.tensor(1.0))), 0.0]

"""Every sampler against its reference, driven by the same denoiser (a tiny seeded UNet) and the same noise.

References: k-diffusion 0.1.1's sampling.py (loaded through tests/_kdiff.py) for the k-diffusion family;
diffusers' DDIMScheduler (ddim), DDPMScheduler (ddpm), LCMScheduler (lcm), UniPCMultistepScheduler (uni_pc).
Tolerance: 1e-5 (absolute, fp32, on latents of magnitude ~1).
"""
import pytest
import torch

import _kdiff
from glass_diffusion.sd_core import samplers as S
from glass_diffusion.sd_core.noise import BrownianTreeNoise
from glass_diffusion.sd_core.family import SD1
from glass_diffusion.sd_core.schedules import ModelDenoiser, get_sigmas
from glass_diffusion.sd_core.unet import UNetConfig, UNetModel

TOL = 1e-5
MS = SD1.model_sampling()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions are far faster on one thread on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig.tiny()).eval()
    ctx = torch.randn(1, 8, unet.config.context_dim)

    def eps_model(x_in, t):  # (B, 4, h, w), (B,) -> eps
        # the ideal eps for N(0, 1) data plus a small UNet term: x0 estimates stay O(1), like a trained model's
        s = MS.sigma(t).reshape(-1, 1, 1, 1)
        return s / (1 + s * s) ** 0.5 * x_in + 0.1 * unet(x_in, t, ctx.expand(x_in.shape[0], -1, -1))

    return eps_model


@pytest.fixture(scope="module")
def denoiser(net):
    calls = []
    d = ModelDenoiser(net, MS)

    def f(x, sigma):
        calls.append(1)
        return d(x, sigma)
    f.calls = calls
    return f


class SeqNoise:
    """The same sequence of standard normals for every run (a seeded CPU generator)."""

    def __init__(self, shape, seed=123):
        self.g = torch.Generator().manual_seed(seed)
        self.shape = shape

    def __call__(self, sigma=None, sigma_next=None):
        return torch.randn(self.shape, generator=self.g)


def _start(sigmas, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g) * sigmas[0]


KDIFF = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_2m",
         "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]


@pytest.mark.parametrize("name", KDIFF)
@pytest.mark.parametrize("scheduler,steps", [("karras", 7), ("normal", 5)])
def test_matches_k_diffusion(name, scheduler, steps, denoiser):
    K = _kdiff.load()
    sigmas = get_sigmas(scheduler, MS, steps, discard_penultimate=name in S.DISCARD_PENULTIMATE_SIGMA_SAMPLERS)
    x = _start(sigmas)
    if name == "lms":
        # k-diffusion 0.1.1 takes a full LMS step to sigma 0; ComfyUI (and we) return the x0 estimate there.
        # Compare up to the last positive sigma, then check the final step separately.
        full = S.sample_lms(denoiser, x, sigmas)
        sigmas = sigmas[:-1]
        last = S.sample_lms(denoiser, x, sigmas)
        assert torch.equal(full, denoiser(last, sigmas[-1] * torch.ones(2)))
    if name in S.SDE_SAMPLERS:
        tree = BrownianTreeNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=42)
        n_ours, n_ref = tree, tree
    else:
        n_ours, n_ref = SeqNoise(x.shape), SeqNoise(x.shape)
    seen = []
    ours = S.get_sampler(name)(denoiser, x, sigmas, n_ours, lambda i, xx, d: seen.append(i))
    kw = {"noise_sampler": n_ref} if name in S.ANCESTRAL_SAMPLERS | S.SDE_SAMPLERS else {}
    ref = getattr(K, f"sample_{name}")(denoiser, x, sigmas, disable=True, **kw)
    err = (ours - ref).abs().max().item()
    assert err < TOL, f"{name}: max error {err:.2e}"
    assert seen == list(range(len(sigmas) - 1))
    assert ours.abs().max() > 0.1  # a real result, not a collapsed one


def test_ddim_matches_diffusers(net):
    """ComfyUI's ddim (Euler) on the ddim_uniform schedule == diffusers' DDIM (eta 0, leading spacing, offset 1)."""
    from diffusers import DDIMScheduler

    steps = 10
    sigmas = get_sigmas("ddim_uniform", MS, steps)
    x = _start(sigmas)
    ours = S.sample_ddim(ModelDenoiser(net, MS), x, sigmas)
    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    sch.set_timesteps(steps)
    assert [float(MS.sigmas[t]) for t in sch.timesteps] == sigmas[:-1].tolist()
    lat = x / (1 + sigmas[0] ** 2) ** 0.5  # diffusers' variance-preserving latent
    for t in sch.timesteps:
        lat = sch.step(net(lat, t.float().expand(2)), t, lat).prev_sample
    err = (ours - lat).abs().max().item()
    assert err < TOL, err


def test_ddpm_matches_diffusers(net):
    from diffusers import DDPMScheduler

    steps = 10
    sigmas = get_sigmas("ddim_uniform", MS, steps)
    x = _start(sigmas)
    ours = S.sample_ddpm(ModelDenoiser(net, MS), x, sigmas, SeqNoise(x.shape))
    sch = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        steps_offset=1, timestep_spacing="leading", variance_type="fixed_small")
    sch.set_timesteps(steps)
    lat = x / (1 + sigmas[0] ** 2) ** 0.5
    ref_noise = SeqNoise(x.shape)
    for t in sch.timesteps:
        g = ref_noise.g
        lat = sch.step(net(lat, t.float().expand(2)), t, lat, generator=g).prev_sample
    err = (ours - lat).abs().max().item()
    assert err < TOL, err


def test_lcm_matches_diffusers(net):
    from diffusers import LCMScheduler

    ts = [999, 759, 499, 259]
    sigmas = torch.tensor([float(MS.sigmas[t]) for t in ts] + [0.0])
    x = _start(sigmas)
    ours = S.sample_lcm(ModelDenoiser(net, MS), x, sigmas, SeqNoise(x.shape))
    # timestep_scaling huge: c_skip -> 0, c_out -> 1, i.e. plain x0 prediction as ComfyUI's lcm uses it
    sch = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                       set_alpha_to_one=True, timestep_scaling=1e9)
    sch.set_timesteps(timesteps=ts)
    lat = x / (1 + sigmas[0] ** 2) ** 0.5
    ref_noise = SeqNoise(x.shape)
    for t in sch.timesteps:
        out = sch.step(net(lat, t.float().expand(2)), t, lat, generator=ref_noise.g)
        lat = out.prev_sample
    # diffusers returns the variance-preserving latent; after the last step it is the x0 estimate
    err = (ours - out.denoised).abs().max().item()
    assert err < TOL, err


def test_callback_can_cancel(denoiser):
    class Stop(Exception):
        pass

    def cb(i, x, d):
        if i == 2:
            raise Stop

    sigmas = get_sigmas("karras", MS, 6)
    with pytest.raises(Stop):
        S.sample_euler(denoiser, _start(sigmas), sigmas, callback=cb)


@pytest.mark.parametrize("name", sorted(S.ANCESTRAL_SAMPLERS | S.SDE_SAMPLERS))
def test_noise_source_is_required(name, denoiser):
    sigmas = get_sigmas("karras", MS, 3)
    n = len(denoiser.calls)
    with pytest.raises(ValueError, match="noise source"):
        S.get_sampler(name)(denoiser, _start(sigmas), sigmas)
    assert len(denoiser.calls) == n  # refused before any model call


def test_registry():
    for name in ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
                 "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim", "ddpm", "uni_pc", "lcm"]:
        assert name in S.SAMPLER_NAMES and callable(S.get_sampler(name))
    with pytest.raises(ValueError, match="unknown sampler"):
        S.get_sampler("euler_a")


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_uni_pc_matches_diffusers(variant, net):
    """ComfyUI's uni_pc (order 3, lower order at the end, last sigma 0 -> 0.001) == diffusers' UniPC multistep
    (data prediction) driven over the same sigmas."""
    from diffusers import UniPCMultistepScheduler

    sigmas = get_sigmas("karras", MS, 8, discard_penultimate=True)
    x = _start(sigmas)
    sampler = S.sample_uni_pc if variant == "bh1" else S.sample_uni_pc_bh2
    seen = []
    ours = sampler(ModelDenoiser(net, MS), x, sigmas, callback=lambda i, xx, d: seen.append(i))
    assert seen == list(range(8))
    sch = UniPCMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  solver_order=3, solver_type=variant, predict_x0=True, lower_order_final=True)
    sch.set_timesteps(8)
    sig = sigmas.clone()
    sig[-1] = 0.001
    ts = MS.timestep(sig[:-1]).long()
    assert len(set(ts.tolist())) == 8
    sch.sigmas, sch.timesteps = sig, ts  # drive diffusers over exactly these noise levels
    lat = x / (1 + sigmas[0] ** 2) ** 0.5
    for t in sch.timesteps:
        lat = sch.step(net(lat, t.float().expand(2)), t, lat).prev_sample
    ref = lat * (1 + 0.001 ** 2) ** 0.5  # back to the k-diffusion variable at sigma 0.001
    err = (ours - ref).abs().max().item()
    assert err < TOL, err

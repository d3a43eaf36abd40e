"""KSampler / KSamplerAdvanced semantics on a tiny UNet: noise, denoise, step ranges, masks, guidance, refusals."""
import math

import pytest
import torch

from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.family import SD1, SD1_INPAINT
from glass_diffusion.sd_core.guidance import CFGDenoiser
from glass_diffusion.sd_core.noise import CPUNoise, DeviceNoise, make_noise_source, prepare_noise
from glass_diffusion.sd_core.sampling import SampleRequest, sample, sample_advanced
from glass_diffusion.sd_core.schedules import get_sigmas
from glass_diffusion.sd_core.unet import UNetConfig, UNetModel

MS = SD1.model_sampling()
SCALE = 0.18215


def H(unet):
    """The model handle of a test UNet (SD 1.x, or SD 1.x inpainting for 9 input channels)."""
    return DiffusionModel.build(unet, SD1_INPAINT if unet.config.in_channels == 9 else SD1)


def sample_kw(unet, positive, negative, latent, callback=None, noise_source=None, **request):
    return sample(H(unet), positive, negative, latent, SampleRequest(**request), callback=callback,
                  noise_source=noise_source)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Counting(torch.nn.Module):
    """The tiny UNet, recording the batch size of every forward call and its inputs."""

    def __init__(self, in_channels=4):
        super().__init__()
        torch.manual_seed(0)
        self.inner = UNetModel(UNetConfig.tiny(in_channels=in_channels)).eval()
        self.config = self.inner.config
        self.batches, self.inputs = [], []

    def forward(self, x, t, context):
        self.batches.append(x.shape[0])
        self.inputs.append(x.detach().clone())
        # the ideal eps for N(0, 1) data plus a small UNet term, so estimates stay O(1) like a trained model's
        s = MS.sigma(t).reshape(-1, 1, 1, 1)
        return s / (1 + s * s) ** 0.5 * x[:, :4] + 0.1 * self.inner(x, t, context)


@pytest.fixture()
def unet():
    return Counting()


def cond(seed, tokens=8, width=32, **opts):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=g), {"pooled_output": None, **opts}]]


POS, NEG = cond(1), cond(2)


def latent(b=1, seed=5, zero=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.zeros(b, 4, 8, 8) if zero else torch.randn(b, 4, 8, 8, generator=g) * 4
    return {"samples": s}


def run(unet, lat=None, **kw):
    args = dict(seed=3, steps=4, cfg=7.0, sampler_name="euler", scheduler="normal")
    args.update(kw)
    return sample_kw(unet, POS, NEG, lat or latent(), **args)


# ---- noise -------------------------------------------------------------------------------------------------
def test_prepare_noise_is_comfyui_draw():
    lat = torch.zeros(3, 4, 8, 8)
    torch.manual_seed(77)
    ref = torch.randn(lat.shape)
    assert torch.equal(prepare_noise(lat, 77), ref)
    # batch_index: each latent gets the noise at its index of one sequential draw
    torch.manual_seed(77)
    rows = [torch.randn(1, 4, 8, 8) for _ in range(4)]
    got = prepare_noise(torch.zeros(3, 4, 8, 8), 77, batch_index=[3, 0, 3])
    assert torch.equal(got, torch.cat([rows[3], rows[0], rows[3]]))


def test_cpu_noise_never_touches_device_generators(monkeypatch):
    x = torch.zeros(2, 4, 8, 8)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    calls = []
    real = torch.randn

    def spy(*a, **k):
        calls.append((k.get("device"), k.get("generator")))
        return real(*a, **k)

    monkeypatch.setattr(torch, "randn", spy)
    src = make_noise_source("cpu", x, seed=9)
    draws = [src(1.0, 0.5) for _ in range(3)]
    monkeypatch.undo()
    assert all(str(d) == "cpu" and g is not None and g.device.type == "cpu" for d, g in calls) and len(calls) == 3
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator was not used
    if cuda_rng is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_rng))
    # on a CPU, the cpu source is exactly ComfyUI's default noise sampler (device generator seeded seed + 1)
    dev = DeviceNoise(x, seed=9)
    assert all(torch.equal(d, dev()) for d in draws)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_noise_same_on_cuda():
    x_cpu, x_gpu = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8, device="cuda")
    a, b = CPUNoise(x_cpu, 4), CPUNoise(x_gpu, 4)
    for _ in range(3):
        nb = b()
        assert nb.device.type == "cuda" and torch.equal(a(), nb.cpu())
    # a whole euler_ancestral run: same image on cuda as on cpu (up to float rounding of the UNet)
    u = Counting()
    out_cpu = run(u, sampler_name="euler_ancestral")["samples"]
    out_gpu = run(u.cuda(), sampler_name="euler_ancestral")["samples"]
    out_dev = run(u, sampler_name="euler_ancestral", noise_kind="device")["samples"]
    assert (out_cpu - out_gpu).abs().max() < 1e-2  # GPU convolutions (TF32) round differently
    assert (out_cpu - out_dev).abs().max() > 0.1  # the device generator gives a different image


def test_start_noise_scaling(unet):
    """Full denoise starts at noise * sqrt(1 + sigma_max^2) (+ latent); denoise < 1 at latent + noise * sigma_0."""
    seen = {}
    lat = latent()
    noise = prepare_noise(lat["samples"], 3)
    run(unet, lat, callback=lambda i, x, d: seen.setdefault(i, x))
    s0 = float(MS.sigma_max)
    assert torch.allclose(seen[0], noise * math.sqrt(1 + s0 ** 2) + lat["samples"] * SCALE, atol=1e-5)
    seen.clear()
    run(unet, lat, denoise=0.5, callback=lambda i, x, d: seen.setdefault(i, x))
    s0 = float(get_sigmas("normal", MS, 4, 0.5)[0])
    assert torch.allclose(seen[0], noise * s0 + lat["samples"] * SCALE, atol=1e-5)


# ---- denoise, step ranges ------------------------------------------------------------------------------------
def test_denoise_zero_returns_input(unet):
    lat = latent()
    out = run(unet, lat, denoise=0.0)
    assert torch.equal(out["samples"], lat["samples"]) and unet.batches == []


@pytest.mark.parametrize("name", ["euler", "euler_ancestral"])
def test_split_schedule_equals_whole(name, unet):
    steps, k = 6, 2
    lat = latent(zero=True)
    whole = sample_advanced(H(unet), POS, NEG, lat, noise_seed=11, steps=steps, cfg=5.0, sampler_name=name,
                            scheduler="karras", noise_source=_shared(name, lat))["samples"]
    shared = _shared(name, lat)
    first = sample_advanced(H(unet), POS, NEG, lat, noise_seed=11, steps=steps, cfg=5.0, sampler_name=name,
                            scheduler="karras", end_at_step=k, return_with_leftover_noise=True, noise_source=shared)
    second = sample_advanced(H(unet), POS, NEG, first, add_noise=False, noise_seed=11, steps=steps, cfg=5.0,
                             sampler_name=name, scheduler="karras", start_at_step=k, noise_source=shared)["samples"]
    # compared in the sampler's (scaled) latent space: the LATENT between the pieces is unscaled and rescaled
    err = (whole - second).abs().max().item() * SCALE
    assert err < 1e-5, err
    assert whole.abs().max() > 0.1


def _shared(name, lat):
    if name == "euler":
        return None
    # the cpu source a whole run would make (seeded seed + 1), shared by both pieces so it continues
    return make_noise_source("cpu", lat["samples"], 11)


def test_leftover_noise_and_full_denoise(unet):
    lat = latent(zero=True)
    part = sample_advanced(H(unet), POS, NEG, lat, noise_seed=1, steps=5, cfg=5.0, sampler_name="euler",
                           scheduler="normal", end_at_step=2, return_with_leftover_noise=True)["samples"]
    full = sample_advanced(H(unet), POS, NEG, lat, noise_seed=1, steps=5, cfg=5.0, sampler_name="euler",
                           scheduler="normal", end_at_step=2, return_with_leftover_noise=False)["samples"]
    assert part.std() > 3 * full.std()  # still noisy at sigma_2 (unscaled latent) vs denoised to 0
    # start past the end: the latent comes back unchanged, no UNet call
    n = len(unet.batches)
    out = sample_advanced(H(unet), POS, NEG, lat, noise_seed=1, steps=5, cfg=5.0, sampler_name="euler",
                          scheduler="normal", start_at_step=5)
    assert torch.equal(out["samples"], lat["samples"]) and len(unet.batches) == n


# ---- guidance ------------------------------------------------------------------------------------------------
def test_cfg_one_batched_call_and_cfg1_skips_uncond(unet):
    run(unet, latent(b=2), steps=3)
    assert unet.batches == [4, 4, 4]  # cond + uncond in one call per step
    unet.batches.clear()
    run(unet, latent(b=2), steps=3, cfg=1.0)
    assert unet.batches == [2, 2, 2]


def test_cfg_formula(unet):
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([3.0])
    g = CFGDenoiser(H(unet), POS, NEG, 6.5, x.shape)
    c = CFGDenoiser(H(unet), POS, NEG, 1.0, x.shape)(x, sigma)
    u = CFGDenoiser(H(unet), NEG, NEG, 1.0, x.shape)(x, sigma)
    assert torch.allclose(g(x, sigma), u + 6.5 * (c - u), atol=1e-5)


def test_conditioning_strength_area_and_timing(unet):
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([3.0])

    def single(cnd):
        return CFGDenoiser(H(unet), cnd, NEG, 1.0, x.shape)(x, sigma)

    a, b = cond(10), cond(11)
    xa, xb = single(a), single(b)
    # strength: a weighted average of the entries' estimates
    both = single(a + [[b[0][0], {"strength": 3.0}]])
    assert torch.allclose(both, (xa + 3 * xb) / 4, atol=1e-5)
    # start/end percent: outside its range an entry is ignored (sigma 3.0 is ~ 40 % into the schedule)
    late = single(a + [[b[0][0], {"start_percent": 0.9}]])
    assert torch.allclose(late, xa, atol=1e-6)
    # area (h, w, y, x in latent cells): outside the area only the first entry counts
    area = single(a + [[b[0][0], {"area": (4, 4, 0, 0), "strength": 1.0}]])
    assert torch.allclose(area[:, :, 4:, :], xa[:, :, 4:, :], atol=1e-6)
    assert not torch.allclose(area[:, :, :4, :4], xa[:, :, :4, :4], atol=1e-3)
    # mask: entry weighted by the mask
    m = torch.zeros(1, 8, 8)
    m[:, :, 4:] = 1
    masked = single(a + [[b[0][0], {"mask": m}]])
    assert torch.allclose(masked[..., :4], xa[..., :4], atol=1e-6)
    assert torch.allclose(masked[..., 4:], (xa[..., 4:] + xb[..., 4:]) / 2, atol=1e-5)


def test_conditioning_masks_cycle_over_a_larger_batch(unet):
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor([3.0, 3.0, 3.0])
    a, b = cond(10), cond(11)
    m = torch.zeros(2, 8, 8)
    m[0, :, 4:] = 1
    m[1, :4] = 1

    def single(mask):
        return CFGDenoiser(H(unet), a + [[b[0][0], {"mask": mask}]], NEG, 1.0, x.shape)(x, sigma)

    got = single(m)  # 2 masks for 3 latents: the third takes the first mask again
    assert torch.allclose(got, single(torch.stack([m[0], m[1], m[0]])), atol=1e-6)
    assert not torch.allclose(got[2], single(torch.stack([m[0], m[1], m[1]]))[2], atol=1e-4)


def test_contexts_of_different_length_share_a_batch(unet):
    long_neg = cond(2, tokens=16)
    sample_kw(unet, POS, long_neg, latent(), seed=1, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal")
    assert unet.batches == [2, 2]


# ---- masks / inpainting ----------------------------------------------------------------------------------------
def test_inpaint_keeps_unmasked_latent(unet):
    lat = latent()
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1  # pixel-space mask, resized to the 8x8 latent
    for name in ["euler", "dpmpp_2m", "ddim", "euler_ancestral"]:
        out = run(unet, {**lat, "noise_mask": mask}, sampler_name=name)["samples"]
        keep = torch.ones(8, 8, dtype=torch.bool)
        keep[2:6, 2:6] = False
        assert (out[..., keep] - lat["samples"][..., keep]).abs().max() < 1e-5, name
        assert (out[..., 3:5, 3:5] - lat["samples"][..., 3:5, 3:5]).abs().max() > 0.1, name


def test_nine_channel_model_gets_mask_and_masked_latent():
    u = Counting(in_channels=9)
    lat = latent()
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1
    sample_kw(u, POS, NEG, {**lat, "noise_mask": mask}, seed=1, steps=2, cfg=3.0, sampler_name="euler",
           scheduler="normal")
    inp = u.inputs[0]
    assert inp.shape == (2, 9, 8, 8)
    assert torch.equal(inp[:, 4], mask.expand(2, 8, 8))
    assert torch.allclose(inp[:, 5:], (lat["samples"] * SCALE).expand(2, -1, -1, -1))


# ---- refusals before any UNet call -------------------------------------------------------------------------------
BAD = [dict(steps=0), dict(steps=1.5), dict(cfg=-1.0), dict(cfg=float("nan")), dict(denoise=1.5),
       dict(denoise=-0.2), dict(denoise=float("nan")), dict(sampler_name="euler_a"), dict(scheduler="linear"),
       dict(seed=-1), dict(noise_kind="gpu"), dict(start_step=-1)]


@pytest.mark.parametrize("kw", BAD, ids=[str(b) for b in BAD])
def test_bad_values_refused_before_unet(kw, unet):
    with pytest.raises(ValueError):
        run(unet, **kw)
    assert unet.batches == []


def test_nan_latent_and_wrong_width_refused(unet):
    lat = latent()
    lat["samples"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        run(unet, lat)
    sdxl = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(ValueError, match="2048.*SDXL"):
        sample_kw(unet, sdxl, NEG, latent(), seed=0, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal")
    assert unet.batches == []


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms",
                                  "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                                  "ddim", "ddpm", "uni_pc", "lcm", "dpmpp_sde_gpu", "uni_pc_bh2"])
def test_every_sampler_runs_through_sample(name, unet):
    out = run(unet, latent(zero=True), sampler_name=name, steps=3)["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.abs().max() > 0.01


def test_multistep_split_restarts_history(unet):
    """Documented boundary behaviour: dpmpp_2m's second piece starts again at first order, so a split run is
    close to, but not equal to, the whole run."""
    lat = latent(zero=True)
    kw = dict(noise_seed=11, steps=6, cfg=5.0, sampler_name="dpmpp_2m", scheduler="karras")
    whole = sample_advanced(H(unet), POS, NEG, lat, **kw)["samples"]
    first = sample_advanced(H(unet), POS, NEG, lat, end_at_step=3, return_with_leftover_noise=True, **kw)
    second = sample_advanced(H(unet), POS, NEG, first, start_at_step=3, **{**kw, "add_noise": False})["samples"]
    diff = (whole - second).abs().max().item()
    assert 1e-4 < diff < 0.5 * whole.abs().max().item()


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"])
def test_sample_is_comfyui_pipeline_on_k_diffusion(name, unet):
    """sample() == ComfyUI's KSampler recipe assembled by hand on k-diffusion 0.1.1: CPU noise from
    manual_seed(seed); x = noise * sqrt(1 + sigma_max^2); the sampler's step noise from a CPU generator seeded
    seed + 1 (ancestral) or k-diffusion's own torchsde BrownianTreeNoiseSampler seeded seed (SDE); / 0.18215."""
    import _kdiff

    K = _kdiff.load()
    seed, lat = 21, latent(b=2, zero=True)
    got = run(unet, lat, seed=seed, sampler_name=name, scheduler="karras", steps=5)["samples"]
    torch.manual_seed(seed)
    noise = torch.randn(lat["samples"].shape)
    sigmas = get_sigmas("karras", MS, 5)
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    den = CFGDenoiser(H(unet), POS, NEG, 7.0, x.shape)
    if name == "euler_ancestral":
        g = torch.Generator().manual_seed(seed + 1)
        ns = lambda s, sn: torch.randn(x.shape, generator=g)  # noqa: E731
    else:
        ns = K.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)
    ref = getattr(K, f"sample_{name}")(den, x, sigmas, noise_sampler=ns, disable=True) / SCALE
    err = (got - ref).abs().max().item() * SCALE
    assert err < 1e-5, err

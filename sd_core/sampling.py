"""KSampler / KSamplerAdvanced equivalents and the few-line text-to-image / image-to-image / inpaint helpers.

`sample` follows ComfyUI's KSampler path (nodes.common_ksampler -> comfy.samplers):
1. noise = prepare_noise(latent, seed, batch_index) on the CPU (zeros when add_noise is off);
2. sigmas from the scheduler for (steps, denoise) (+1 step and the penultimate sigma dropped for dpm_2,
   dpm_2_ancestral, uni_pc), then cut to [start_step, last_step] (last_step with force_full_denoise ends at 0);
3. the latent is multiplied by the model's latent scale factor (its LatentFormat); x = latent + noise * sigma_0, or
   latent + noise * sqrt(1 + sigma_0^2) when sigma_0 is the model's largest sigma;
4. with a noise_mask, every denoiser call blends the known latent back (KSamplerX0Inpaint): the input is
   x * m + (latent + sigma * noise) * (1 - m) and the output x0 * m + latent * (1 - m);
5. the sampler runs; the result is divided by the scale factor.

`sample(model, positive, negative, latent, request)`: model is the `DiffusionModel` handle (its family's
prediction type and schedule decide the algebra), request a `SampleRequest`. The pieces are public:
`check_request`, `plan_sigmas`, `prepare` (denoiser, noisy start, step-noise source), then the sampler function.

Split runs: for single-step samplers, running steps [0, k) with return_with_leftover_noise and then [k, n) with
add_noise off gives the whole run's result, provided the ancestral noise continues (pass one `noise_source`
object to both calls; ComfyUI, like our default, starts a fresh seeded source at every call). Multistep samplers
(lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, uni_pc) keep a history of x0 estimates that is lost at the boundary:
the second piece restarts at first order (and uni_pc stops at sigma 0.001 and re-evaluates its first point), so
a split run differs slightly from the whole run there. Brownian-tree samplers build their tree over each piece's
own sigma range, so their noise differs too.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import samplers
from .conditioning import encode_prompt
from .diffusion import DiffusionModel
from .errors import ParamError
from .guidance import CFGDenoiser, check_cfg, check_conditioning
from .noise import NOISE_KINDS, CPUNoise, make_noise_source, prepare_noise
from .pixels import decode_latent, downscale, encode_pixels, prepare_inpaint
from .schedules import check_scheduler, check_sigmas, get_sigmas, validate_denoise, validate_steps


@dataclass(frozen=True)
class SampleRequest:
    """What to run (KSampler / KSamplerAdvanced / SamplerCustom inputs), apart from the model and the data.

    start_step / last_step: KSamplerAdvanced's range (last_step with force_full_denoise ends at sigma 0).
    noise_kind: step noise of ancestral / SDE samplers: "cpu" (default; the same image on any device, and
        exactly ComfyUI's result on a CPU) or "device" (ComfyUI's behaviour on a GPU).
    sigmas: explicit SIGMAS (SamplerCustom); then steps / scheduler / denoise are only checked.
    sampler_options: extra keyword arguments of the sampler function.
    """
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str = "normal"
    denoise: float = 1.0
    add_noise: bool = True
    start_step: Optional[int] = None
    last_step: Optional[int] = None
    force_full_denoise: bool = False
    noise_kind: str = "cpu"
    sigmas: Optional[torch.Tensor] = None
    sampler_options: dict = field(default_factory=dict)

    @classmethod
    def advanced(cls, *, noise_seed, start_at_step=0, end_at_step=10000, return_with_leftover_noise=False,
                 **kw) -> "SampleRequest":
        """KSamplerAdvanced's inputs and semantics."""
        return cls(seed=noise_seed, start_step=start_at_step, last_step=end_at_step,
                   force_full_denoise=not return_with_leftover_noise, **kw)


def check_request(request: SampleRequest) -> SampleRequest:
    """The request with its values checked and normalised (cfg and denoise as floats, sigmas as a float32 copy);
    ParamError naming the field otherwise."""
    if not isinstance(request, SampleRequest):
        raise TypeError(f"expected a SampleRequest, got {type(request).__name__}")
    r = request
    validate_steps(r.steps)
    denoise = validate_denoise(r.denoise)
    _as_param("sampler_name", samplers.get_sampler, r.sampler_name)
    check_scheduler(r.scheduler)
    if r.noise_kind not in NOISE_KINDS:
        raise ParamError("noise_kind", f"noise_kind must be one of {NOISE_KINDS}, got {r.noise_kind!r}")
    if isinstance(r.seed, bool) or not isinstance(r.seed, int) or not 0 <= r.seed < 2 ** 64:
        raise ParamError("seed", f"seed must be an integer in 0..2**64-1, got {r.seed!r}")
    for name in ("start_step", "last_step"):
        v = getattr(r, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ParamError(name, f"{name} must be an integer >= 0, got {v!r}")
    sigmas = check_sigmas(torch.as_tensor(r.sigmas)) if r.sigmas is not None else None
    return replace(r, cfg=check_cfg(r.cfg), denoise=denoise, sigmas=sigmas, sampler_options=dict(r.sampler_options))


def _as_param(name, check, value):
    try:
        return check(value)
    except ParamError:
        raise
    except ValueError as e:
        raise ParamError(name, str(e)) from None


def _check_finite(name, t):
    if not torch.isfinite(t).all():
        raise ParamError(name, f"{name} contains NaN or infinite values")


def check_latent(model, latent, name="latent") -> torch.Tensor:
    """The samples [B, C, h, w] of a LATENT that fits the model's latent format; ParamError(name) otherwise."""
    if not isinstance(latent, dict) or not torch.is_tensor(latent.get("samples")):
        raise ParamError(name, f"{name} must be a LATENT dict with a 'samples' tensor")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise ParamError(name, f"{name} samples must be [B, C, h, w], got shape {tuple(samples.shape)}")
    channels = model.latent_format.channels
    if samples.shape[1] != channels:
        raise ParamError(name, f"expected a {channels}-channel {model.family.line} latent, got {samples.shape[1]} "
                               "channels")
    _check_finite(name, samples)
    mask = latent.get("noise_mask")
    if mask is not None:
        if not torch.is_tensor(mask) or mask.ndim < 2:
            raise ParamError(name, f"{name} noise_mask must be a tensor [B, H, W], got {type(mask).__name__}")
        _check_finite(name, mask)
    return samples


# ---- masks and inpainting ----------------------------------------------------------------------------------
def prepare_mask(mask, shape):
    """noise_mask [B|1, H, W] (any size) -> [B, C, h, w] by bilinear resize, as ComfyUI."""
    mask = mask.float().reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
    mask = F.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    mask = mask.repeat(1, shape[1], 1, 1)[:, :shape[1]]
    if mask.shape[0] < shape[0]:
        mask = mask.repeat(math.ceil(shape[0] / mask.shape[0]), 1, 1, 1)
    return mask[:shape[0]]


def inpaint_concat(model, latent, mask):
    """Extra input channels of a 9-channel inpainting UNet: [mask (1), masked-image latent (C)] for the scaled
    latent [B, C, h, w]; without a mask, mask 1 and the family's blank (grey image) latent."""
    if mask is None:
        return torch.cat([torch.ones_like(latent[:, :1]), model.latent_format.blank_inpaint_like(latent)], dim=1)
    return torch.cat([mask[:, :1].round().to(latent.dtype), latent], dim=1)


class InpaintDenoiser:
    """Keeps the unmasked latent fixed: the model sees the known region re-noised to the current sigma and its
    estimate there is replaced by the known latent."""

    def __init__(self, inner, latent, mask, noise):
        self.inner, self.latent, self.mask, self.noise = inner, latent, mask, noise

    def __call__(self, x, sigma):
        if self.mask is None:
            return self.inner(x, sigma)
        m, keep = self.mask, 1.0 - self.mask
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        x = x * m + (self.latent + s * self.noise) * keep
        return self.inner(x, sigma) * m + self.latent * keep


def guided_denoiser(model, positive, negative, cfg, scaled, mask=None) -> CFGDenoiser:
    """The CFG denoiser for a scaled latent [B, C, h, w] (on the model's device), with the 9-channel inpainting
    inputs when the model takes them. mask: the prepared noise mask [B, C, h, w] or None."""
    concat = inpaint_concat(model, scaled, mask) if model.is_inpaint else None
    return CFGDenoiser(model, positive, negative, cfg, scaled.shape, concat=concat)


def guided_eval(model, positive, negative, latent: dict, cfg, sigma: float) -> tuple:
    """One guided evaluation at noise level sigma: (eps, x0) as LATENT dicts (eps in the scaled latent space,
    x0 unscaled), the latent's noise_mask feeding a 9-channel model's mask channel."""
    samples = check_latent(model, latent)
    check_conditioning(positive, model, "positive")
    check_conditioning(negative, model, "negative")
    sigma = float(sigma)
    if not sigma > 0:
        raise ParamError("sigma", f"sigma must be > 0 (at sigma 0 the latent is clean), got {sigma}")
    device, scale = model.device, model.scaling_factor
    x = samples.to(device, torch.float32) * scale
    mask = latent.get("noise_mask")
    mask = prepare_mask(mask, x.shape).to(device) if mask is not None and model.is_inpaint else None
    guider = guided_denoiser(model, positive, negative, cfg, x, mask)
    with torch.no_grad():
        x0 = guider(x, torch.full((x.shape[0],), sigma, device=device))
    eps = (x - x0) / sigma
    return {**latent, "samples": eps.float().cpu()}, {**latent, "samples": (x0 / scale).float().cpu()}


# ---- sampling ------------------------------------------------------------------------------------------------
def plan_sigmas(sampling, request: SampleRequest) -> torch.Tensor:
    """The exact SIGMAS `sample` runs (len - 1 = number of steps, e.g. for a progress bar); empty when nothing
    is to be done. KSampler's schedule for (steps, denoise) on `sampling` (a ModelSampling), then
    KSamplerAdvanced's cut: up to last_step (its sigma replaced by 0 with force_full_denoise), from start_step."""
    r = check_request(request)
    sigmas = r.sigmas
    if sigmas is None:
        sigmas = get_sigmas(r.scheduler, sampling, r.steps, r.denoise,
                            discard_penultimate=r.sampler_name in samplers.DISCARD_PENULTIMATE_SIGMA_SAMPLERS)
    if r.last_step is not None and r.last_step < len(sigmas) - 1:
        sigmas = sigmas[:r.last_step + 1].clone()
        if r.force_full_denoise:
            sigmas[-1] = 0
    if r.start_step is not None:
        sigmas = sigmas[r.start_step:] if r.start_step < len(sigmas) - 1 else sigmas[:0]
    return sigmas


class Prepared(NamedTuple):
    """Everything a sampler function needs: denoiser(x, sigma) -> x0, the noisy start, the schedule, the
    step-noise source (None for deterministic samplers)."""
    denoiser: Callable
    x: torch.Tensor
    sigmas: torch.Tensor
    noise_source: Optional[Callable]


def prepare(model, positive, negative, latent: dict, request: SampleRequest, sigmas, noise_source=None) -> Prepared:
    """Noise, device, latent scale, inpainting inputs and the step-noise policy for one pass (ComfyUI's order)."""
    r = request
    latent_image = latent["samples"]
    if r.add_noise:
        noise = prepare_noise(latent_image, r.seed, latent.get("batch_index"))
    else:
        noise = torch.zeros(latent_image.shape, dtype=latent_image.dtype)
    device = model.device
    x_latent = latent_image.to(device, torch.float32) * model.scaling_factor
    noise = noise.to(device, torch.float32)
    sigmas = sigmas.to(device)
    noise_mask = latent.get("noise_mask")
    mask = prepare_mask(noise_mask, x_latent.shape).to(device) if noise_mask is not None else None
    guider = guided_denoiser(model, positive, negative, r.cfg, x_latent, mask)
    blend_noise = noise
    if mask is not None and r.sampler_name in samplers.INPAINT_RANDOM_NOISE_SAMPLERS:
        blend_noise = CPUNoise(noise, r.seed)()  # fresh noise, seed + 1 on the CPU
    denoiser = InpaintDenoiser(guider, x_latent, mask, blend_noise)

    ms = model.sampling
    x = ms.noise_scaling(sigmas[0], noise, x_latent, ms.is_max_denoise(sigmas))
    if noise_source is None and samplers.needs_noise(r.sampler_name):
        # "cpu": every generator and Brownian tree on the CPU. "device": ComfyUI's choice, i.e. generators on
        # the device, trees on the CPU for dpmpp_sde / dpmpp_2m_sde / dpmpp_3m_sde and on the device for *_gpu.
        cpu_tree = samplers.BROWNIAN_SAMPLERS.get(r.sampler_name)
        kind = r.noise_kind
        if cpu_tree is not None and r.noise_kind == "device":
            kind = "cpu" if cpu_tree else "device"
        noise_source = make_noise_source(kind, x, r.seed, sigmas, brownian=cpu_tree is not None)
    return Prepared(denoiser, x, sigmas, noise_source)


def sample(model, positive, negative, latent: dict, request: SampleRequest, *, noise_source=None,
           callback=None) -> dict:
    """Run one KSampler(Advanced) pass of `model` (a DiffusionModel). Returns a new LATENT dict (unscaled samples,
    float32, CPU).

    latent: {"samples": [B, C, h, w] unscaled, "noise_mask"?: [B|1, H, W], "batch_index"?: list[int]}.
    noise_source: optional explicit step-noise callable (overrides request.noise_kind; share it to split a run).
    callback(step, x, denoised): per step; raise from it to cancel.
    Every value is checked before any UNet call (ParamError naming it).
    """
    request = check_request(request)
    latent_image = check_latent(model, latent)
    check_conditioning(positive, model, "positive")
    check_conditioning(negative, model, "negative")
    sigmas = plan_sigmas(model.sampling, request)
    if len(sigmas) == 0:  # denoise 0, or start_step at or past the end
        return {**latent, "samples": latent_image.clone()}
    p = prepare(model, positive, negative, latent, request, sigmas, noise_source)
    sampler = samplers.get_sampler(request.sampler_name)
    out = sampler(p.denoiser, p.x, p.sigmas, p.noise_source, callback, **request.sampler_options)
    return {**latent, "samples": (out / model.scaling_factor).float().cpu()}


def sample_advanced(model, positive, negative, latent, *, noise_source=None, callback=None, **kw):
    """KSamplerAdvanced's inputs and semantics (keyword arguments of SampleRequest.advanced)."""
    return sample(model, positive, negative, latent, SampleRequest.advanced(**kw), noise_source=noise_source,
                  callback=callback)


# ---- high-level helpers ---------------------------------------------------------------------------------
def _run(model, tokenizer, prompt, negative, latent, clip_skip, request: SampleRequest):
    """model: a StableDiffusion with its family; encode both prompts, sample, decode."""
    layer = model.family.text[0].default_layer if clip_skip is None else clip_skip
    pos = encode_prompt(model.clip, tokenizer, prompt, clip_skip=layer)
    neg = encode_prompt(model.clip, tokenizer, negative, clip_skip=layer)
    out = sample(DiffusionModel.from_checkpoint(model), pos, neg, latent, request)
    return decode_latent(model.vae, out["samples"])


def txt2img(model, tokenizer, prompt, negative="", *, width=512, height=512, batch_size=1, seed=0, steps=20,
            cfg=8.0, sampler_name="euler", scheduler="normal", clip_skip=None, **kw):
    """Text to IMAGE [B, H, W, 3] (0..1) with a StableDiffusion model. clip_skip None: the family's layer.
    **kw: further SampleRequest fields."""
    f = downscale(model.vae)  # 8 for SD
    latent = {"samples": torch.zeros(batch_size, model.config.vae.latent_channels, height // f, width // f)}
    request = SampleRequest(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, **kw)
    return _run(model, tokenizer, prompt, negative, latent, clip_skip, request)


def img2img(model, tokenizer, image, prompt, negative="", *, denoise=0.75, seed=0, steps=20, cfg=8.0,
            sampler_name="euler", scheduler="normal", clip_skip=None, **kw):
    """IMAGE [B, H, W, 3] (0..1) -> IMAGE, re-noised to `denoise` and sampled back."""
    latent = {"samples": encode_pixels(model.vae, image)}
    request = SampleRequest(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                            denoise=denoise, **kw)
    return _run(model, tokenizer, prompt, negative, latent, clip_skip, request)


def inpaint(model, tokenizer, image, mask, prompt, negative="", *, denoise=1.0, grow_mask_by=6, seed=0, steps=20,
            cfg=8.0, sampler_name="euler", scheduler="normal", clip_skip=None, **kw):
    """Repaint where mask [B|1, H, W] is 1. 4-channel models: encode the image, sample with a noise_mask.
    9-channel inpainting models: the image goes through `pixels.prepare_inpaint` (ComfyUI's
    VAEEncodeForInpaint: masked pixels grey, mask grown by `grow_mask_by` pixels)."""
    if model.family.is_inpaint:
        image, noise_mask = prepare_inpaint(image, mask, downscale(model.vae), grow_mask_by)
    else:
        noise_mask = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=image.shape[1:3],
                                   mode="bilinear")
    latent = {"samples": encode_pixels(model.vae, image), "noise_mask": noise_mask.squeeze(1)}
    request = SampleRequest(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                            denoise=denoise, **kw)
    return _run(model, tokenizer, prompt, negative, latent, clip_skip, request)

"""KSampler / KSamplerAdvanced equivalents and the few-line text-to-image / image-to-image / inpaint helpers.

`sample` follows ComfyUI's KSampler path (nodes.common_ksampler -> comfy.samplers):
1. noise = prepare_noise(latent, seed, batch_index) on the CPU (zeros when add_noise is off);
2. sigmas from the scheduler for (steps, denoise) (+1 step and the penultimate sigma dropped for dpm_2,
   dpm_2_ancestral, uni_pc), then cut to [start_step, last_step] (last_step with force_full_denoise ends at 0);
3. the latent is multiplied by the VAE scaling factor; x = latent + noise * sigma_0, or
   latent + noise * sqrt(1 + sigma_0^2) when sigma_0 is the model's largest sigma;
4. with a noise_mask, every denoiser call blends the known latent back (KSamplerX0Inpaint): the input is
   x * m + (latent + sigma * noise) * (1 - m) and the output x0 * m + latent * (1 - m);
5. the sampler runs; the result is divided by the scaling factor.

Split runs: for single-step samplers, running steps [0, k) with return_with_leftover_noise and then [k, n) with
add_noise off gives the whole run's result, provided the ancestral noise continues (pass one `noise_source`
object to both calls; ComfyUI, like our default, starts a fresh seeded source at every call). Multistep samplers
(lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, uni_pc) keep a history of x0 estimates that is lost at the boundary:
the second piece restarts at first order (and uni_pc stops at sigma 0.001 and re-evaluates its first point), so
a split run differs slightly from the whole run there. Brownian-tree samplers build their tree over each piece's
own sigma range, so their noise differs too.
"""
import math

import torch
import torch.nn.functional as F

from . import samplers as S
from .guidance import CFGDenoiser
from .noise import NOISE_KINDS, make_noise_source, prepare_noise
from .schedules import ModelSampling, SCHEDULER_NAMES, get_sigmas, validate_denoise, validate_steps

# the latent of an all-zero (mid-grey) image, used as the masked image of a 9-channel model without a mask
_BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def prepare_mask(mask, shape):
    """noise_mask [B|1, H, W] (any size) -> [B, C, h, w] by bilinear resize, as ComfyUI."""
    mask = mask.float().reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
    mask = F.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    mask = mask.repeat(1, shape[1], 1, 1)[:, :shape[1]]
    if mask.shape[0] < shape[0]:
        mask = mask.repeat(math.ceil(shape[0] / mask.shape[0]), 1, 1, 1)
    return mask[:shape[0]]


def inpaint_concat(latent, mask):
    """Extra input channels of a 9-channel inpainting UNet: [mask (1), masked-image latent (4)]."""
    if mask is None:
        blank = torch.tensor(_BLANK_INPAINT_LATENT, dtype=latent.dtype, device=latent.device)
        return torch.cat([torch.ones_like(latent[:, :1]), blank.view(1, -1, 1, 1).expand_as(latent)], dim=1)
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


def _check_finite(t, what):
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or infinite values")


def _check_step(v, what):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {v!r}")
    return v


def plan_sigmas(scheduler, sampler_name, steps, denoise=1.0, start_step=None, last_step=None,
                force_full_denoise=False, model_sampling=None, sigmas=None):
    """The exact SIGMAS `sample` runs (len - 1 = number of steps, e.g. for a progress bar); empty when nothing
    is to be done. KSampler's schedule for (steps, denoise), then KSamplerAdvanced's cut: up to last_step (its
    sigma replaced by 0 with force_full_denoise), from start_step."""
    if sigmas is None:
        sigmas = get_sigmas(scheduler, model_sampling or ModelSampling(), steps, denoise,
                            discard_penultimate=sampler_name in S.DISCARD_PENULTIMATE_SIGMA_SAMPLERS)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        sigmas = sigmas[start_step:] if start_step < len(sigmas) - 1 else sigmas[:0]
    return sigmas


def sample(unet, positive, negative, latent, *, seed, steps, cfg, sampler_name, scheduler, denoise=1.0,
           add_noise=True, start_step=None, last_step=None, force_full_denoise=False, noise_kind="cpu",
           noise_source=None, callback=None, model_sampling=None, scaling_factor=0.18215, sigmas=None,
           sampler_options=None):
    """Run one KSampler(Advanced) pass. Returns a new LATENT dict (unscaled samples, float32, CPU).

    unet: UNetModel (or any module with forward(x, timesteps, context) and .config.context_dim / in_channels).
    latent: {"samples": [B, 4, h, w] unscaled, "noise_mask"?: [B|1, H, W], "batch_index"?: list[int]}.
    noise_kind: step noise of ancestral / SDE samplers: "cpu" (default; the same image on any device, and
        exactly ComfyUI's result on a CPU) or "device" (ComfyUI's behaviour on a GPU).
    noise_source: optional explicit step-noise callable (overrides noise_kind; share it to split a run).
    callback(step, x, denoised): per step; raise from it to cancel.
    sigmas: explicit SIGMAS (SamplerCustom); then steps/scheduler/denoise only get validated.
    """
    # ---- refuse bad values before any UNet call
    validate_steps(steps)
    cfg_f = float(cfg)
    if not math.isfinite(cfg_f) or cfg_f < 0:
        raise ValueError(f"cfg must be a finite number >= 0, got {cfg!r}")
    denoise = validate_denoise(denoise)
    S.get_sampler(sampler_name)
    if scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULER_NAMES}")
    if noise_kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {noise_kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an integer in 0..2**64-1, got {seed!r}")
    start_step, last_step = _check_step(start_step, "start_step"), _check_step(last_step, "last_step")
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError("latent must be a LATENT dict with 'samples'")
    latent_image = latent["samples"]
    if latent_image.ndim != 4:
        raise ValueError(f"latent samples must be [B, C, h, w], got shape {tuple(latent_image.shape)}")
    _check_finite(latent_image, "latent samples")
    noise_mask = latent.get("noise_mask")
    if noise_mask is not None:
        _check_finite(noise_mask, "noise_mask")
    in_ch = getattr(getattr(unet, "config", None), "in_channels", None)
    if in_ch is not None and in_ch not in (latent_image.shape[1], latent_image.shape[1] + 5):
        raise ValueError(f"latent has {latent_image.shape[1]} channels but the UNet takes {in_ch}")
    ms = model_sampling or ModelSampling()
    guider = CFGDenoiser(unet, positive, negative, cfg_f, latent_image.shape, ms)  # validates the conditioning

    # ---- noise and schedule (ComfyUI's order)
    if add_noise:
        noise = prepare_noise(latent_image, seed, latent.get("batch_index"))
    else:
        noise = torch.zeros(latent_image.shape, dtype=latent_image.dtype)
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).clone()
        _check_finite(sigmas, "sigmas")
    sigmas = plan_sigmas(scheduler, sampler_name, steps, denoise, start_step, last_step, force_full_denoise, ms,
                         sigmas)
    if len(sigmas) == 0:  # denoise 0, or start_step at or past the end
        return {**latent, "samples": latent_image.clone()}

    # ---- to the UNet's device, latent scaled
    device = next(unet.parameters()).device if isinstance(unet, torch.nn.Module) else torch.device("cpu")
    x_latent = latent_image.to(device, torch.float32) * scaling_factor
    noise = noise.to(device, torch.float32)
    sigmas = sigmas.to(device)
    mask = prepare_mask(noise_mask, x_latent.shape).to(device) if noise_mask is not None else None
    if in_ch is not None and in_ch == x_latent.shape[1] + 5:
        guider.concat = inpaint_concat(x_latent, mask)
    blend_noise = noise
    if mask is not None and sampler_name in S.INPAINT_RANDOM_NOISE_SAMPLERS:
        g = torch.Generator(device="cpu")
        g.manual_seed((seed + 1) % 2 ** 64)
        blend_noise = torch.randn(noise.shape, generator=g, device="cpu").to(device, noise.dtype)
    denoiser = InpaintDenoiser(guider, x_latent, mask, blend_noise)

    x = ms.noise_scaling(sigmas[0], noise, x_latent, ms.is_max_denoise(sigmas))
    if noise_source is None and S.needs_noise(sampler_name):
        # "cpu": every generator and Brownian tree on the CPU. "device": ComfyUI's choice, i.e. generators on
        # the device, trees on the CPU for dpmpp_sde / dpmpp_2m_sde / dpmpp_3m_sde and on the device for *_gpu.
        cpu_tree = S.BROWNIAN_SAMPLERS.get(sampler_name)
        kind = noise_kind
        if cpu_tree is not None and noise_kind == "device":
            kind = "cpu" if cpu_tree else "device"
        noise_source = make_noise_source(kind, x, seed, sigmas, brownian=cpu_tree is not None)
    out = S.get_sampler(sampler_name)(denoiser, x, sigmas, noise_source, callback, **(sampler_options or {}))
    return {**latent, "samples": (out / scaling_factor).float().cpu()}


def sample_advanced(unet, positive, negative, latent, *, add_noise=True, noise_seed, steps, cfg, sampler_name,
                    scheduler, start_at_step=0, end_at_step=10000, return_with_leftover_noise=False, **kw):
    """KSamplerAdvanced's inputs and semantics."""
    return sample(unet, positive, negative, latent, seed=noise_seed, steps=steps, cfg=cfg,
                  sampler_name=sampler_name, scheduler=scheduler, add_noise=add_noise, start_step=start_at_step,
                  last_step=end_at_step, force_full_denoise=not return_with_leftover_noise, **kw)


# ---- high-level helpers ---------------------------------------------------------------------------------
def _encode(model, tokenizer, text, clip_skip):
    from .conditioning import encode_prompt

    return encode_prompt(model.clip, tokenizer, text, clip_skip=clip_skip)


def _to_image(model, latent):
    vae = model.vae
    with torch.no_grad():
        p = next(vae.parameters())
        img = vae.decode(latent["samples"].to(p.device, p.dtype)).float()
    return ((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()  # (B, 3, H, W) -> (B, H, W, 3) in 0..1


def _to_latent(model, image):
    vae = model.vae
    p = next(vae.parameters())
    with torch.no_grad():
        x = image.permute(0, 3, 1, 2).to(p.device, p.dtype) * 2 - 1  # (B, H, W, 3) 0..1 -> (B, 3, H, W) -1..1
        return vae.encode(x).mode().float().cpu()


def _run(model, tokenizer, prompt, negative, latent, clip_skip, **kw):
    pos = _encode(model, tokenizer, prompt, clip_skip)
    neg = _encode(model, tokenizer, negative, clip_skip)
    scale = getattr(getattr(model.config, "vae", None), "scaling_factor", 0.18215)
    out = sample(model.unet, pos, neg, latent, scaling_factor=scale, **kw)
    return _to_image(model, out)


def txt2img(model, tokenizer, prompt, negative="", *, width=512, height=512, batch_size=1, seed=0, steps=20,
            cfg=8.0, sampler_name="euler", scheduler="normal", clip_skip=-1, **kw):
    """Text to IMAGE [B, H, W, 3] (0..1) with a StableDiffusion model."""
    vcfg = model.config.vae
    f = 2 ** (len(vcfg.channel_mult) - 1)  # 8 for SD 1.x
    latent = {"samples": torch.zeros(batch_size, vcfg.latent_channels, height // f, width // f)}
    return _run(model, tokenizer, prompt, negative, latent, clip_skip, seed=seed, steps=steps, cfg=cfg,
                sampler_name=sampler_name, scheduler=scheduler, **kw)


def img2img(model, tokenizer, image, prompt, negative="", *, denoise=0.75, seed=0, steps=20, cfg=8.0,
            sampler_name="euler", scheduler="normal", clip_skip=-1, **kw):
    """IMAGE [B, H, W, 3] (0..1) -> IMAGE, re-noised to `denoise` and sampled back."""
    latent = {"samples": _to_latent(model, image)}
    return _run(model, tokenizer, prompt, negative, latent, clip_skip, seed=seed, steps=steps, cfg=cfg,
                sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, **kw)


def inpaint(model, tokenizer, image, mask, prompt, negative="", *, denoise=1.0, grow_mask_by=6, seed=0, steps=20,
            cfg=8.0, sampler_name="euler", scheduler="normal", clip_skip=-1, **kw):
    """Repaint where mask [B|1, H, W] is 1. 4-channel models: encode the image, sample with a noise_mask.
    9-channel inpainting models: the masked pixels are set to grey before encoding (ComfyUI's
    VAEEncodeForInpaint) and the mask is grown by `grow_mask_by` pixels."""
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    mask = F.interpolate(mask, size=image.shape[1:3], mode="bilinear")
    if model.config.unet.in_channels == 9:
        keep = (1.0 - mask.round()).squeeze(1).unsqueeze(-1)  # (B, H, W, 1)
        image = (image - 0.5) * keep + 0.5
        if grow_mask_by:
            kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
            mask = F.conv2d(mask.round(), kernel, padding=math.ceil((grow_mask_by - 1) / 2)).clamp(0, 1)
            mask = mask[:, :, :image.shape[1], :image.shape[2]]
        mask = mask.round()
    latent = {"samples": _to_latent(model, image), "noise_mask": mask.squeeze(1)}
    return _run(model, tokenizer, prompt, negative, latent, clip_skip, seed=seed, steps=steps, cfg=cfg,
                sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, **kw)

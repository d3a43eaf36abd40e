"""Sampling nodes: scheduler (-> SIGMAS), sampler choice (-> GLASS_SAMPLER), the full denoise loop, a
denoise-steps node running steps [start, end) of a schedule, a UNet-predict node, a KSampler, and two nodes that
return a re-configured copy of the UNet handle: the prediction type / zero-terminal-SNR override
(ModelSamplingDiscrete) and RescaleCFG.

All of them call sd_core.sampling.sample (ComfyUI's KSampler semantics: noise, latent scale, noise masks,
9-channel inpainting). Progress goes through nodes/progress.py: ComfyUI's progress bar, Cancel button and
latent previews inside ComfyUI; a tqdm bar (and Ctrl-C cancel) headless.
"""
from __future__ import annotations

import torch

from . import comfy_memory, progress
from .types import (CONDITIONING, GLASS_SAMPLER, GLASS_UNET, LATENT, SIGMAS, GlassSampler, GlassUNet,
                    NodeInputError, node_inputs)

CATEGORY = "Glass Diffusion/sampling"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
NOISE_KINDS = ["cpu", "device"]  # sd_core.noise.NOISE_KINDS (a test checks they agree)


def sampler_names() -> list[str]:
    from ..sd_core.samplers import SAMPLER_NAMES
    return list(SAMPLER_NAMES)


def scheduler_names() -> list[str]:
    from ..sd_core.schedules import SCHEDULER_NAMES
    return list(SCHEDULER_NAMES)


def check_unet(node: str, unet) -> GlassUNet:
    if not isinstance(unet, GlassUNet):
        raise NodeInputError(node, "unet", f"expected a GLASS_UNET (from a Glass checkpoint loader), got "
                                           f"{type(unet).__name__}")
    return unet


def latent_preview(denoised: torch.Tensor, latent_format):
    """An RGB preview (PIL) of the first latent of a batch of scaled x0 estimates (the family's linear fit)."""
    from PIL import Image
    x0 = denoised[0].detach().float().cpu()
    if x0.shape[0] != latent_format.channels:
        return None
    rgb = latent_format.preview_rgb(x0)  # (C, h, w) -> (h, w, 3)
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8)
    return Image.fromarray(rgb.numpy())


class _Progress:
    """sd_core callback(step, x, denoised): progress, Cancel, previews; remembers the last x0 estimate."""

    def __init__(self, total: int, desc: str, latent_format):
        self.bar = progress.ProgressBar(total, desc=desc)
        self.total, self.last_x0, self.previews, self.node = total, None, progress.previews_enabled(), desc
        self.latent_format = latent_format
        # stop, not blank: no GPU sync per step, the error still names the first non-finite step
        self.finite = progress.FiniteGuard(desc, "the UNet's x0 estimate", total)

    def __call__(self, step, x, denoised):
        self.finite(step, denoised)
        self.last_x0 = denoised
        preview = latent_preview(denoised, self.latent_format) if self.previews else None
        self.bar.update_absolute(step + 1, self.total, preview)

    def close(self):
        self.bar.close()


def use_networks(unet: GlassUNet, *conditionings) -> None:
    """Inside ComfyUI: have its model management load the UNet and the ControlNets riding on the conditionings."""
    from ..sd_core.controlnet import CONTROL_KEY
    nets = {id(unet.model.unet): unet.model.unet}
    for cond in conditionings:
        for _, opts in cond or ():
            app = opts.get(CONTROL_KEY) if isinstance(opts, dict) else None
            nets.update((id(link.net), link.net) for link in (app.chain() if app is not None else ()))
    comfy_memory.use(*nets.values())


def run_sampler(node: str, unet: GlassUNet, positive, negative, latent: dict, request, on_step=None,
                **param_inputs: str):
    """sd_core.sampling.sample with progress; returns (LATENT result, LATENT last x0 estimate). sd_core's
    parameter errors become NodeInputError(node, input); param_inputs maps sd_core parameter names to the node's
    input names where they differ (the latent is `latent_image` unless said otherwise). on_step(step, x, denoised),
    if given, is called after the progress update of every step."""
    from ..sd_core.sampling import plan_sigmas, sample
    with node_inputs(node, **{"latent": "latent_image", **param_inputs}):
        total = len(plan_sigmas(unet.model.sampling, request)) - 1  # the exact schedule: it sizes the progress bar
        progress.check_cancel()
        use_networks(unet, positive, negative)
        bar = _Progress(max(total, 1), node, unet.model.latent_format)

        def callback(step, x, denoised):
            bar(step, x, denoised)
            if on_step is not None:
                on_step(step, x, denoised)
        try:
            with torch.no_grad():
                out = sample(unet.model, positive, negative, latent, request, callback=callback)
            bar.finite.finish()
        finally:
            bar.close()
    x0 = dict(out)
    if bar.last_x0 is not None:
        x0["samples"] = (bar.last_x0 / unet.scaling_factor).float().cpu()
    return out, x0


def _request(sampler: GlassSampler, **kw):
    from ..sd_core.sampling import SampleRequest
    options = dict(sampler.options)
    return SampleRequest(sampler_name=sampler.name, noise_kind=options.pop("noise", "cpu"),
                         sampler_options=options, **kw)


def _cfg_input():
    return ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip":
                      "Classifier-free guidance scale: how strongly the positive prompt (against the negative) "
                      "steers the image. 1 = no guidance (the negative is skipped)."})


def _seed_input(name="seed"):
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip":
                    "The seed of the starting noise (drawn on the CPU, so the same on every machine)."})


def _cond_inputs():
    return {"positive": (CONDITIONING, {"tooltip": "What the image should show."}),
            "negative": (CONDITIONING, {"tooltip": "What the image should not show."})}


class GlassScheduler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet": (GLASS_UNET, {"tooltip": "The UNet whose noise schedule is used."}),
            "scheduler": (scheduler_names(), {"default": "normal", "tooltip": "How the noise levels are spaced."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Number of steps."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                        "Below 1, only the last part of a longer schedule is kept (for image-to-image)."}),
        }}

    RETURN_TYPES = (SIGMAS,)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("The noise levels, descending, ending with 0 (steps + 1 values).",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY
    DESCRIPTION = "Builds a noise schedule (SIGMAS) for the denoise loop and denoise-steps nodes."

    def get_sigmas(self, unet, scheduler, steps, denoise):
        from ..sd_core.schedules import get_sigmas
        node = "GlassScheduler"
        unet = check_unet(node, unet)
        with node_inputs(node):
            return (get_sigmas(scheduler, unet.model.sampling, steps, denoise).float().cpu(),)


class GlassSamplerSelect:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler_name": (sampler_names(), {"default": "euler", "tooltip": "The sampling method."}),
            "step_noise": (NOISE_KINDS, {"default": "cpu", "tooltip":
                           "Ancestral / SDE samplers: 'cpu' draws their step noise on the CPU (same image on any "
                           "device); 'device' draws it on the GPU as ComfyUI does."}),
        }}

    RETURN_TYPES = (GLASS_SAMPLER,)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("The sampler, for the denoise loop and denoise-steps nodes.",)
    FUNCTION = "select"
    CATEGORY = CATEGORY
    DESCRIPTION = "Chooses a sampling method (euler, dpmpp_2m, ...)."

    def select(self, sampler_name, step_noise="cpu"):
        node = "GlassSamplerSelect"
        if sampler_name not in sampler_names():
            raise NodeInputError(node, "sampler_name", f"{sampler_name!r} is not one of {sampler_names()}")
        if step_noise not in NOISE_KINDS:
            raise NodeInputError(node, "step_noise", f"{step_noise!r} is not one of {NOISE_KINDS}")
        return (GlassSampler(sampler_name, {"noise": step_noise}),)


def _check_sampler(node: str, sampler) -> GlassSampler:
    if not isinstance(sampler, GlassSampler):
        raise NodeInputError(node, "sampler", f"expected a GLASS_SAMPLER (from Sampler Select (Glass)), got "
                                              f"{type(sampler).__name__}")
    return sampler


class GlassSample:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet": (GLASS_UNET, {"tooltip": "The denoising UNet."}),
            "add_noise": ("BOOLEAN", {"default": True, "tooltip": "Add the seed's noise at the first sigma "
                          "(off: the latent already carries its noise)."}),
            "noise_seed": _seed_input("noise_seed"),
            "cfg": _cfg_input(),
            **_cond_inputs(),
            "sampler": (GLASS_SAMPLER, {"tooltip": "The sampling method."}),
            "sigmas": (SIGMAS, {"tooltip": "The noise schedule to follow."}),
            "latent_image": (LATENT, {"tooltip": "The latent to denoise (empty, encoded, or partly denoised)."}),
        }}

    RETURN_TYPES = (LATENT, LATENT)
    RETURN_NAMES = ("output", "denoised_output")
    OUTPUT_TOOLTIPS = ("The latent after the last sigma.", "The model's x0 estimate at the last step.")
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "The full denoise loop over a given schedule, with a chosen sampler (as SamplerCustom)."

    def sample(self, unet, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image):
        from ..sd_core.schedules import check_sigmas
        node = "GlassSample"
        unet = check_unet(node, unet)
        sampler = _check_sampler(node, sampler)
        with node_inputs(node):
            sigmas = check_sigmas(sigmas)
        if len(sigmas) < 2:
            return (latent_image, latent_image)
        request = _request(sampler, seed=noise_seed, steps=len(sigmas) - 1, cfg=cfg, sigmas=sigmas,
                           add_noise=bool(add_noise))
        return run_sampler(node, unet, positive, negative, latent_image, request, seed="noise_seed",
                           last_step="end_step")


class GlassDenoiseSteps:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet": (GLASS_UNET, {"tooltip": "The denoising UNet."}),
            **_cond_inputs(),
            "sampler": (GLASS_SAMPLER, {"tooltip": "The sampling method."}),
            "sigmas": (SIGMAS, {"tooltip": "The whole schedule; this node runs part of it."}),
            "latent_image": (LATENT, {"tooltip": "The latent at sigmas[start_step] (or clean, with add_noise)."}),
            "add_noise": ("BOOLEAN", {"default": False, "tooltip": "Add the seed's noise first: on for the first "
                          "stage, off for later stages (their latent still carries noise)."}),
            "noise_seed": _seed_input("noise_seed"),
            "cfg": _cfg_input(),
            "start_step": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "First step to run (0-based)."}),
            "end_step": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip":
                         "Stop before this step: runs steps [start_step, end_step). One step = one denoise step "
                         "of the UNet (one call per step for euler)."}),
        }}

    RETURN_TYPES = (LATENT, LATENT)
    RETURN_NAMES = ("latent", "x0")
    OUTPUT_TOOLTIPS = ("The latent at sigmas[end_step], with its remaining noise (clean when end_step is the last).",
                       "The model's x0 estimate at the last step run: decode it to see the stage's preview.")
    FUNCTION = "denoise"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs steps [start_step, end_step) of a schedule and returns the partly denoised latent and its "
                   "x0 estimate: chain several to watch the image form step by step.")

    def denoise(self, unet, positive, negative, sampler, sigmas, latent_image, add_noise, noise_seed, cfg,
                start_step, end_step):
        from ..sd_core.schedules import check_sigmas
        node = "GlassDenoiseSteps"
        unet = check_unet(node, unet)
        sampler = _check_sampler(node, sampler)
        with node_inputs(node):
            sigmas = check_sigmas(sigmas)
        n = len(sigmas) - 1
        if not 0 <= start_step < n:
            raise NodeInputError(node, "start_step", f"must be in 0..{n - 1} for a {n}-step schedule, got {start_step}")
        if not start_step < end_step <= n:
            raise NodeInputError(node, "end_step", f"must be in {start_step + 1}..{n} (after start_step {start_step}, "
                                                   f"at most the {n} steps of the schedule), got {end_step}")
        request = _request(sampler, seed=noise_seed, steps=n, cfg=cfg, sigmas=sigmas, add_noise=bool(add_noise),
                           start_step=start_step, last_step=end_step, force_full_denoise=False)
        return run_sampler(node, unet, positive, negative, latent_image, request, seed="noise_seed",
                           last_step="end_step")


class GlassUNetPredict:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet": (GLASS_UNET, {"tooltip": "The denoising UNet."}),
                **_cond_inputs(),
                "latent": (LATENT, {"tooltip": "A noisy latent at noise level sigma."}),
                "cfg": _cfg_input(),
                "sigma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.001, "round": False,
                                    "tooltip": "The latent's noise level (used when no sigmas are connected)."}),
            },
            "optional": {
                "sigmas": (SIGMAS, {"tooltip": "A schedule: when connected, sigma = sigmas[step]."}),
                "step": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "Index into sigmas."}),
            },
        }

    RETURN_TYPES = (LATENT, LATENT)
    RETURN_NAMES = ("noise_pred", "x0")
    OUTPUT_TOOLTIPS = ("The guided noise prediction eps (unit variance, the sampler's scaled latent space).",
                       "The x0 estimate (x - sigma * eps, back in the unscaled latent space): decode it to look.")
    FUNCTION = "predict"
    CATEGORY = CATEGORY
    DESCRIPTION = "One guided UNet evaluation: the noise prediction and the clean-image (x0) estimate at a sigma."

    def predict(self, unet, positive, negative, latent, cfg, sigma, sigmas=None, step=0):
        from ..sd_core.sampling import guided_eval
        from ..sd_core.schedules import check_sigmas
        node = "GlassUNetPredict"
        unet = check_unet(node, unet)
        with node_inputs(node):
            if sigmas is not None:
                sigmas = check_sigmas(sigmas)
                if not 0 <= step < len(sigmas):
                    raise NodeInputError(node, "step", f"must be in 0..{len(sigmas) - 1}, got {step}")
                sigma = float(sigmas[step])
            progress.check_cancel()
            use_networks(unet, positive, negative)
            return guided_eval(unet.model, positive, negative, latent, cfg, sigma)


class GlassKSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet": (GLASS_UNET, {"tooltip": "The denoising UNet."}),
            "seed": _seed_input(),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Number of denoising steps."}),
            "cfg": _cfg_input(),
            "sampler_name": (sampler_names(), {"default": "euler", "tooltip": "The sampling method."}),
            "scheduler": (scheduler_names(), {"default": "normal", "tooltip": "How the noise levels are spaced."}),
            **_cond_inputs(),
            "latent_image": (LATENT, {"tooltip": "The latent to denoise: empty for text-to-image, encoded for "
                             "image-to-image, with a noise mask for inpainting."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                        "How much to change the input: 1 = everything (text-to-image), less keeps its structure."}),
        }}

    RETURN_TYPES = (LATENT,)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "All-in-one sampling (as ComfyUI's KSampler): noise, schedule, sampler and guidance in one node."

    def sample(self, unet, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
        from ..sd_core.sampling import SampleRequest
        node = "GlassKSampler"
        unet = check_unet(node, unet)
        request = SampleRequest(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                denoise=denoise)
        out, _ = run_sampler(node, unet, positive, negative, latent_image, request)
        return (out,)


SAMPLING_CHOICES = {"eps": "eps", "v_prediction": "v"}  # ModelSamplingDiscrete's names -> sd_core's predictions


class GlassModelSamplingDiscrete:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet": (GLASS_UNET, {"tooltip": "The UNet whose prediction type and noise schedule are set."}),
            "sampling": (list(SAMPLING_CHOICES), {"default": "eps", "tooltip":
                         "What the UNet predicts: eps (noise; SD 1.x, SD 2.x 512) or v_prediction (SD 2.x 768-v). "
                         "Overrides the loader's guess."}),
            "zsnr": ("BOOLEAN", {"default": False, "tooltip": "Zero terminal SNR: the schedule rescaled so its "
                     "last step is pure noise (for models trained that way)."}),
        }}

    RETURN_TYPES = (GLASS_UNET,)
    OUTPUT_TOOLTIPS = ("The same UNet (weights shared) with this prediction type and schedule.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = "Sets the UNet's prediction type (eps / v_prediction) and zero-terminal-SNR schedule (as ModelSamplingDiscrete)."

    def patch(self, unet, sampling, zsnr=False):
        from ..sd_core.schedules import ModelSampling
        node = "GlassModelSamplingDiscrete"
        unet = check_unet(node, unet)
        if sampling not in SAMPLING_CHOICES:
            raise NodeInputError(node, "sampling", f"{sampling!r} is not one of {list(SAMPLING_CHOICES)}")
        with node_inputs(node, prediction="sampling"):
            ms = ModelSampling(unet.family.schedule, SAMPLING_CHOICES[sampling], zsnr=bool(zsnr))
        return (unet.with_sampling(ms),)


class GlassRescaleCFG:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet": (GLASS_UNET, {"tooltip": "The UNet to sample with rescaled guidance."}),
            "multiplier": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                           "How much of the rescaled guidance to use: 0 = plain CFG, 1 = fully rescaled."}),
        }}

    RETURN_TYPES = (GLASS_UNET,)
    OUTPUT_TOOLTIPS = ("The same UNet (weights shared); samplers using it rescale classifier-free guidance.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = ("RescaleCFG: the guided prediction rescaled towards the positive prompt's spread (Lin et al. 2023), "
                   "against the over-exposure of high cfg; made for v-prediction models.")

    def patch(self, unet, multiplier):
        import math
        node = "GlassRescaleCFG"
        unet = check_unet(node, unet)
        try:
            value = float(multiplier)
        except (TypeError, ValueError):
            value = float("nan")
        if isinstance(multiplier, bool) or not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise NodeInputError(node, "multiplier", f"must be a number in 0..1, got {multiplier!r}")
        return (unet.replace(rescale_cfg=value),)


NODE_CLASS_MAPPINGS = {"GlassScheduler": GlassScheduler, "GlassSamplerSelect": GlassSamplerSelect,
                       "GlassSample": GlassSample, "GlassDenoiseSteps": GlassDenoiseSteps,
                       "GlassUNetPredict": GlassUNetPredict, "GlassKSampler": GlassKSampler,
                       "GlassModelSamplingDiscrete": GlassModelSamplingDiscrete, "GlassRescaleCFG": GlassRescaleCFG}
NODE_DISPLAY_NAME_MAPPINGS = {"GlassScheduler": "Scheduler (Glass)", "GlassSamplerSelect": "Sampler Select (Glass)",
                              "GlassSample": "Sample (Glass)", "GlassDenoiseSteps": "Denoise Steps (Glass)",
                              "GlassUNetPredict": "UNet Predict (Glass)", "GlassKSampler": "KSampler (Glass)",
                              "GlassModelSamplingDiscrete": "Model Sampling Discrete (Glass)",
                              "GlassRescaleCFG": "Rescale CFG (Glass)"}

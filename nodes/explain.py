"""See through it: attention maps (which word painted which pixels), the step film (how the picture formed) and
an animation saver.

- Attention Maps (Glass): samples like the KSampler while sd_core.attention_maps records the UNet's
  cross-attention for the positive prompt, decodes the picture and returns, per typed word, a MASK (the word's
  map scaled to 0..1, or cut at a threshold; usable wherever a MASK goes, inpainting included) and an IMAGE
  heat-map over the picture labelled with the word.
- Step Film (Glass): samples like the KSampler and returns, for every step, the decoded x0 estimate and the
  noisy latent (decoded after the model's input scaling, x / sqrt(1 + sigma^2) for SD) as IMAGE batches, and a
  film: both side by side with the step and sigma written on each frame.
- Save Animation (Glass): an IMAGE batch as one animated WebP or GIF (Pillow), through the run's output
  transaction (never overwritten, never half-written).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from . import image as image_nodes
from . import comfy_memory, outputs, paths
from .latent import check_latent
from .sampling import (_cfg_input, _seed_input, check_unet, run_sampler, sampler_names,
                       scheduler_names)
from .text import WEIGHTINGS, check_clip, note_unknown_words
from .types import (CONDITIONING, GLASS_CLIP, GLASS_UNET, GLASS_VAE, IMAGE, LATENT, MASK, NodeInputError,
                    node_inputs)
from .vae import check_vae

CATEGORY = "Glass Diffusion/explain"
ANIMATION_FORMATS = ("webp", "gif")
# heat-map colours (0 -> 1): black, blue, red, yellow, white
_STOPS = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.1, 0.8], [0.9, 0.1, 0.1], [1.0, 0.85, 0.1], [1.0, 1.0, 1.0]])


def heat_colours(m: torch.Tensor) -> torch.Tensor:
    """[..., H, W] in 0..1 -> [..., H, W, 3] RGB through the heat-map colour stops."""
    x = m.clamp(0, 1) * (len(_STOPS) - 1)
    i = x.floor().long().clamp(max=len(_STOPS) - 2)
    f = (x - i)[..., None]
    return _STOPS[i] * (1 - f) + _STOPS[i + 1] * f


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow or one without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _draw_lines(pil, lines, xy, size: int, box: bool = True):
    from PIL import ImageDraw
    draw, font = ImageDraw.Draw(pil), _font(size)
    x, y = xy
    for line in lines:
        left, top, right, bottom = draw.textbbox((x, y), line, font=font)
        if box:
            draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), line, fill=(255, 255, 255), font=font)
        y = bottom + 3


def _to_tensor(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)


def heat_map_image(picture: torch.Tensor, m: torch.Tensor, label: str) -> torch.Tensor:
    """picture [H, W, 3] and map [H, W] (0..1) -> [H, W, 3]: the map's colours over the picture, labelled."""
    a = (0.25 + 0.6 * m.clamp(0, 1))[..., None]  # low attention shows the picture, high the heat colour
    blended = picture * (1 - a) + heat_colours(m) * a
    pil = image_nodes.image_to_pil(blended)
    _draw_lines(pil, [label], (3, 2), max(9, min(pil.size) // 7))
    return _to_tensor(pil)


def _upscaled(images: torch.Tensor, k: int) -> torch.Tensor:
    """[B, H, W, 3] -> [B, kH, kW, 3] (nearest: every pixel a k x k block)."""
    return images.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2) if k > 1 else images


def film_frames(noisy: torch.Tensor, x0: torch.Tensor, sigmas, min_panel: int = 128) -> torch.Tensor:
    """IMAGE batches [S, H, W, 3] of the noisy latent and the x0 estimate at each step -> labelled frames
    [S, H', W', 3]: the two side by side (pixels enlarged to at least `min_panel` px), a caption below."""
    S, H, W, _ = x0.shape
    k = max(1, math.ceil(min_panel / min(H, W)))
    panels = torch.cat([_upscaled(noisy, k), torch.ones(S, H * k, 4, 3), _upscaled(x0, k)], dim=2)
    size = max(10, H * k // 11)
    caption = size * 2 + 16  # two lines and their descenders
    frames = []
    from PIL import Image
    for s in range(S):
        pil = Image.new("RGB", (panels.shape[2], panels.shape[1] + caption), (0, 0, 0))
        pil.paste(image_nodes.image_to_pil(panels[s]), (0, 0))
        _draw_lines(pil, ["noisy latent"], (3, 2), max(9, size * 3 // 4))
        _draw_lines(pil, ["x0 estimate"], (W * k + 4 + 3, 2), max(9, size * 3 // 4))
        _draw_lines(pil, [f"step {s + 1}/{S}", f"sigma {float(sigmas[s]):.4g}"], (4, H * k + 3), size, box=False)
        frames.append(_to_tensor(pil))
    return torch.stack(frames)


def _sample_inputs():
    return {
        "seed": _seed_input(),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Number of denoising steps."}),
        "cfg": _cfg_input(),
        "sampler_name": (sampler_names(), {"default": "euler", "tooltip": "The sampling method."}),
        "scheduler": (scheduler_names(), {"default": "normal", "tooltip": "How the noise levels are spaced."}),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "How much to change the input: 1 = everything (text-to-image), less keeps its structure."}),
    }


def _request(seed, steps, cfg, sampler_name, scheduler, denoise):
    from ..sd_core.sampling import SampleRequest
    return SampleRequest(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                         denoise=denoise)


def _pick_words(node: str, words: list, wanted: str) -> list:
    """The words named in `wanted` (comma separated, as typed or as labelled; empty: every word)."""
    names = [n.strip().lower() for n in (wanted or "").split(",") if n.strip()]
    if not names:
        return list(words)
    out = []
    for n in names:
        match = [w for w in words if w.label.lower() == n] or [w for w in words if w.text.lower() == n]
        if not match:
            raise NodeInputError(node, "words", f"{n!r} is not a word of the prompt; its words are "
                                                f"{', '.join(w.label for w in words) or '(none)'}")
        out += [w for w in match if w not in out]
    return out


class GlassAttentionMaps:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet": (GLASS_UNET, {"tooltip": "The denoising UNet."}),
                "clip": (GLASS_CLIP, {"tooltip": "The text encoder: it encodes the prompt and maps its tokens "
                                                 "back to the words you typed."}),
                "vae": (GLASS_VAE, {"tooltip": "The autoencoder that decodes the picture."}),
                "text": ("STRING", {"multiline": True, "tooltip":
                         "The positive prompt (same syntax as Text Encode: weights, embeddings, long prompts)."}),
                "negative": (CONDITIONING, {"tooltip": "What the image should not show."}),
                "latent_image": (LATENT, {"tooltip": "The latent to denoise (empty for text-to-image)."}),
                **_sample_inputs(),
            },
            "optional": {
                "words": ("STRING", {"default": "", "tooltip":
                          "Comma-separated words to map (as typed; a repeated word is 'red (2)'). Empty: every "
                          "word of the prompt."}),
                "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                              "0: soft masks (each word's map scaled to 0..1). Above 0: masks are 1 where the "
                              "scaled map is at least this (DAAM uses 0.4)."}),
                "weighting": (list(WEIGHTINGS), {"default": "comfy", "tooltip": "Prompt weighting, as Text Encode."}),
            },
        }

    RETURN_TYPES = (IMAGE, MASK, IMAGE, "STRING", LATENT)
    RETURN_NAMES = ("image", "masks", "heatmaps", "words", "latent")
    OUTPUT_TOOLTIPS = (
        "The generated picture, [B, H, W, 3].",
        "One mask per word and picture, [B x words, H, W] (picture by picture, words in prompt order).",
        "One heat-map per word and picture over the picture, labelled with the word, [B x words, H, W, 3].",
        "The mapped words, one per line, in mask order.",
        "The denoised latent.",
    )
    FUNCTION = "explain"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Samples like the KSampler while recording the UNet's cross-attention, and shows which word of "
                   "the prompt acted where: a mask and a labelled heat-map per word (averaged over heads, layers "
                   "and steps; DAAM).")

    def explain(self, unet, clip, vae, text, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                denoise=1.0, words="", threshold=0.0, weighting="comfy"):
        from ..sd_core import attention_maps as am
        from ..sd_core import pixels as px
        from ..sd_core.conditioning import encode_prompt
        from ..sd_core.errors import ParamError
        node = "GlassAttentionMaps"
        unet, clip, vae = check_unet(node, unet), check_clip(node, clip), check_vae(node, vae)
        comfy_memory.use(clip.model)  # inside ComfyUI: loaded by its model management
        if not isinstance(text, str):
            raise NodeInputError(node, "text", f"expected a string, got {type(text).__name__}")
        samples = check_latent(node, "latent_image", latent_image)
        with node_inputs(node, clip_skip="clip", tokenizer="clip", windows="text"):
            try:
                windows, typed = am.prompt_words(text, clip.tokenizer, clip.embeddings_dir, clip.model.config.width)
                positive = encode_prompt(clip.patched_model(), clip.tokenizer, text, clip_skip=clip.clip_skip,
                                         weighting=weighting, windows=windows)
            except ParamError:
                raise
            except (ValueError, FileNotFoundError, KeyError) as e:  # bad weight syntax, unknown embedding, ...
                raise NodeInputError(node, "text", str(e)) from e
        note_unknown_words(node, clip, text)
        chosen = _pick_words(node, typed, words)
        request = _request(seed, steps, cfg, sampler_name, scheduler, denoise)
        recorder = am.AttentionRecorder(positive[0][0], samples.shape[0], tuple(samples.shape[-2:]))
        with recorder:
            out, _ = run_sampler(node, unet, positive, negative, latent_image, request)
        comfy_memory.use(vae.model)  # inside ComfyUI: loaded by its model management (it may have moved)
        picture = px.decode_latent(vae.model, out["samples"])  # (B, H, W, 3)
        B, H, W, _ = picture.shape
        maps = am.word_maps(recorder.token_maps((H, W)), chosen)  # (B, n, H, W), each scaled to 0..1
        masks = (maps >= threshold).float() if threshold > 0 else maps
        heat = [heat_map_image(picture[b], maps[b, i], w.label) for b in range(B) for i, w in enumerate(chosen)]
        n = len(chosen)
        masks = masks.reshape(B * n, H, W) if n else torch.zeros(B, H, W)
        heat = torch.stack(heat) if heat else picture.clone()
        return (picture, masks.contiguous(), heat, "\n".join(w.label for w in chosen), out)


class GlassStepFilm:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet": (GLASS_UNET, {"tooltip": "The denoising UNet."}),
            "positive": (CONDITIONING, {"tooltip": "What the image should show."}),
            "negative": (CONDITIONING, {"tooltip": "What the image should not show."}),
            "vae": (GLASS_VAE, {"tooltip": "The autoencoder that decodes every frame."}),
            "latent_image": (LATENT, {"tooltip": "The latent to denoise; the film shows its first picture."}),
            **_sample_inputs(),
        }}

    RETURN_TYPES = (IMAGE, IMAGE, IMAGE, LATENT)
    RETURN_NAMES = ("film", "x0", "noisy", "latent")
    OUTPUT_TOOLTIPS = (
        "One frame per step: the noisy latent and the x0 estimate side by side, with the step and sigma.",
        "The decoded x0 estimate at every step, [steps, H, W, 3].",
        "The noisy latent at every step, decoded after the model's input scaling, [steps, H, W, 3].",
        "The denoised latent (the whole batch).",
    )
    FUNCTION = "film"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Samples like the KSampler and films it: at every step the decoded x0 estimate (what the model "
                   "thinks the picture is) and the noisy latent it starts the step from.")

    def film(self, unet, positive, negative, vae, latent_image, seed, steps, cfg, sampler_name, scheduler,
             denoise=1.0):
        from ..sd_core import pixels as px
        from ..sd_core.sampling import plan_sigmas
        node = "GlassStepFilm"
        unet, vae = check_unet(node, unet), check_vae(node, vae)
        check_latent(node, "latent_image", latent_image)
        request = _request(seed, steps, cfg, sampler_name, scheduler, denoise)
        with node_inputs(node):
            sigmas = plan_sigmas(unet.model.sampling, request)
        ms = unet.model.sampling
        xs, x0s, shown = [], [], []

        def keep(step, x, denoised):
            sigma = sigmas[step].to(x.device)
            xs.append(ms.calculate_input(sigma.reshape(1), x[:1]).float().cpu())
            x0s.append(denoised[:1].float().cpu())
            shown.append(float(sigmas[step]))

        out, _ = run_sampler(node, unet, positive, negative, latent_image, request, on_step=keep)
        scale = unet.scaling_factor
        comfy_memory.use(vae.model)  # inside ComfyUI: loaded by its model management
        if not x0s:  # nothing to do (denoise 0): one frame of the input
            x0 = px.decode_latent(vae.model, out["samples"][:1])
            return (film_frames(x0, x0, [0.0]), x0, x0, out)
        x0 = px.decode_latent(vae.model, torch.cat(x0s) / scale)
        noisy = px.decode_latent(vae.model, torch.cat(xs) / scale)
        return (film_frames(noisy, x0, shown), x0, noisy, out)


class GlassSaveAnimation:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": (IMAGE, {"tooltip": "The frames, in order (an IMAGE batch, e.g. a Step Film)."}),
                "filename_prefix": ("STRING", {"default": "GlassFilm", "tooltip":
                                    "File name prefix (as Save Image); files are numbered and never overwritten."}),
                "format": (list(ANIMATION_FORMATS), {"default": "webp", "tooltip":
                           "webp: lossless animated WebP. gif: 256-colour GIF (plays everywhere)."}),
                "fps": ("FLOAT", {"default": 4.0, "min": 0.1, "max": 60.0, "step": 0.1, "tooltip":
                        "Frames per second."}),
                "loop": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "Times to play; 0 = forever."}),
            },
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves an IMAGE batch as one animated WebP or GIF in the output folder."

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix="GlassFilm"):
        problem = None if filename_prefix is None else image_nodes.check_prefix(filename_prefix)
        return True if problem is None else problem

    def save(self, images, filename_prefix="GlassFilm", format="webp", fps=4.0, loop=0):
        node = "GlassSaveAnimation"
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise NodeInputError(node, "images", f"expected an IMAGE tensor [B, H, W, 3], got "
                                                 f"{getattr(images, 'shape', type(images).__name__)}")
        if format not in ANIMATION_FORMATS:
            raise NodeInputError(node, "format", f"must be one of {ANIMATION_FORMATS}, got {format!r}")
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and 0 < fps <= 60):
            raise NodeInputError(node, "fps", f"must be in (0, 60], got {fps!r}")
        result = save_animation(node, images, filename_prefix, paths.output_dir(), format, fps, int(loop))
        return {"ui": {"images": [result], "animated": (True,)}}


def save_animation(node: str, images: torch.Tensor, filename_prefix: str, root, fmt: str, fps: float,
                   loop: int = 0) -> dict:
    """Write the frames as one '<prefix>_<NNNNN>_.webp|.gif' under root in the run's output transaction (or one of
    this call's); returns the ui entry."""
    folder, name, subfolder = image_nodes.output_target(node, filename_prefix, root, images.shape[2], images.shape[1])
    frames = [image_nodes.image_to_pil(im.expand(-1, -1, 3) if im.shape[-1] == 1 else im[..., :3]) for im in images]
    duration = max(10, round(1000.0 / fps))  # ms per frame

    def write(f):
        first, rest = frames[0], frames[1:]
        if fmt == "webp":
            first.save(f, format="WEBP", save_all=True, append_images=rest, duration=duration, loop=loop,
                       lossless=True, method=4)
        else:
            first.save(f, format="GIF", save_all=True, append_images=rest, duration=duration, loop=loop,
                       optimize=False, disposal=1)

    entry = {"filename": None, "subfolder": subfolder, "type": "output"}
    with contextlib.ExitStack() as stack:
        txn = outputs.current()
        if txn is None:  # inside ComfyUI: this call's own transaction
            txn = stack.enter_context(outputs.transaction())
        txn.stage(folder, name, image_nodes.next_counter(folder, name), write, entry, suffix="." + fmt)
    return entry


NODE_CLASS_MAPPINGS = {"GlassAttentionMaps": GlassAttentionMaps, "GlassStepFilm": GlassStepFilm,
                       "GlassSaveAnimation": GlassSaveAnimation}
NODE_DISPLAY_NAME_MAPPINGS = {"GlassAttentionMaps": "Attention Maps (Glass)", "GlassStepFilm": "Step Film (Glass)",
                              "GlassSaveAnimation": "Save Animation (Glass)"}

"""The resource budget of a Glass graph, decided at validation, before any work (nodes/validation.py calls
``check_graph`` once every node is valid).

Each Glass node that makes or changes latents or images declares here what its outputs will be (latent
``(batch, h, w)``, image ``(batch, H, W)``, schedule length) from its widget values and what its inputs will
be, walking the graph in dependency order; nodes of other packs are unknown and cost nothing. From that:

- work: latent pixels x batch x guidance copies (2 when cfg != 1) x sampling steps, summed over the samplers,
  against ``max_work`` (runtime settings; GLASS_DIFFUSION_MAX_WORK; 2**31 by default);
- schedule: ``denoise < 1`` builds ``int(steps / denoise)`` noise levels (ComfyUI's rule) and keeps the last
  ones; more than MAX_SCHEDULE_STEPS is refused (``denoise`` 1e-9 would ask for 20 billion);
- memory: the outputs the run keeps (latents, images, the checkpoint files' weights) plus the largest working
  set of one node (UNet or VAE activations per pixel, SD 1.x widths in fp32: an over-estimate for smaller
  models and fp16), against the device's free memory and ``max_memory_gb`` (GLASS_DIFFUSION_MAX_MEMORY_GB);
- prompts: at most MAX_PROMPT_CHARS characters.

A graph over any of these is refused with the figures, naming the node and the input to change. The figures
are estimates meant to catch what cannot run (a 16384-pixel image, a batch of 4096, a 1e-9 denoise); the
defaults are far above what a user asks for by accident.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

from . import paths
from .errors import GraphError

MAX_SCHEDULE_STEPS = 100_000
MAX_PROMPT_CHARS = 20_000
UNET_BYTES_PER_LATENT_PIXEL = 40 * 1024  # SD 1.x UNet activations alive at once, fp32, per latent pixel
VAE_BYTES_PER_PIXEL = 5 * 1024           # SD 1.x VAE encoder / decoder activations, fp32, per image pixel
MAX_IMAGE_FRAMES = 4096
GB = 1024 ** 3


class _Cost:
    def __init__(self):
        self.work = 0.0
        self.work_by = []        # (work, node id, class_type, input, description)
        self.kept = 0.0          # bytes of outputs kept during the run
        self.working = []        # (bytes, node id, class_type, input, description): each node's working set
        self.errors: list[GraphError] = []


def _latent_bytes(fact) -> float:
    return 0.0 if fact is None else fact[0] * 4 * fact[1] * fact[2] * 4.0


def _image_bytes(fact) -> float:
    return 0.0 if fact is None else fact[0] * fact[1] * fact[2] * 4 * 4.0  # image + mask, float32


# ----------------------------------------------------------------------------- what each node makes
# fn(node id, class_type, inputs (literal values), facts of linked inputs {name: fact}, cost) -> output facts

def _empty_latent(nid, ct, inputs, facts, cost):
    b, w, h = inputs.get("batch_size", 1), inputs.get("width", 512), inputs.get("height", 512)
    fact = (int(b), max(1, int(h) // 8), max(1, int(w) // 8))
    cost.kept += _latent_bytes(fact)
    return (fact,)


def _latent_upscale(nid, ct, inputs, facts, cost):
    src = facts.get("samples")
    if src is None:
        return (None,)
    w, h = int(inputs.get("width", 0) or 0), int(inputs.get("height", 0) or 0)
    if w == 0 and h == 0:
        return (src,)
    if w == 0:
        w = round(src[2] * 8 * h / (src[1] * 8))
    elif h == 0:
        h = round(src[1] * 8 * w / (src[2] * 8))
    fact = (src[0], max(64, h) // 8, max(64, w) // 8)
    cost.kept += _latent_bytes(fact)
    return (fact,)


def _same_latent(nid, ct, inputs, facts, cost):
    return (facts.get("samples"),)


def _from_batch(nid, ct, inputs, facts, cost):
    src = facts.get("samples")
    if src is None:
        return (None,)
    start = min(src[0] - 1, int(inputs.get("batch_index", 0)))
    return ((max(1, min(src[0] - start, int(inputs.get("length", 1)))), src[1], src[2]),)


def _load_image(nid, ct, inputs, facts, cost):
    from PIL import Image
    from .image import image_path
    try:
        path = image_path(ct, inputs.get("image"))
        with Image.open(path) as im:
            w, h = im.size
            frames = min(getattr(im, "n_frames", 1), MAX_IMAGE_FRAMES + 1)
    except Exception:  # the node's own validation reports a missing or unreadable image
        return (None, None)
    fact = (frames, h, w)
    if frames > MAX_IMAGE_FRAMES:
        cost.errors.append(GraphError("resource_budget", f"the image has more than {MAX_IMAGE_FRAMES} frames",
                                      nid, ct, "image"))
    cost.kept += _image_bytes(fact)
    return (fact, fact)


def _vae_encode(nid, ct, inputs, facts, cost):
    img = facts.get("pixels")
    if img is None:
        return (None,)
    b, h, w = img
    tile = inputs.get("tile_size")
    pixels = b * (min(h, tile) * min(w, tile) if tile else h * w)
    _work_memory(cost, pixels * VAE_BYTES_PER_PIXEL, nid, ct, "pixels", f"encoding {b} x {w}x{h} px")
    fact = (b, max(1, h // 8), max(1, w // 8))
    cost.kept += _latent_bytes(fact)
    return (fact,)


def _vae_decode(nid, ct, inputs, facts, cost):
    lat = facts.get("samples")
    if lat is None:
        return (None,)
    b, h, w = lat
    tile = inputs.get("tile_size")
    pixels = b * (min(8 * h, tile) * min(8 * w, tile) if tile else 64 * h * w)
    _work_memory(cost, pixels * VAE_BYTES_PER_PIXEL, nid, ct, "samples", f"decoding {b} x {8 * w}x{8 * h} px")
    fact = (b, 8 * h, 8 * w)
    cost.kept += _image_bytes(fact)
    return (fact,)


def _scheduler(nid, ct, inputs, facts, cost):
    steps = int(inputs.get("steps", 20))
    return ((_schedule(cost, nid, ct, steps, inputs.get("denoise", 1.0)),),)


def _sampler(nid, ct, inputs, facts, cost):
    lat = facts.get("latent_image") if "latent_image" in facts else facts.get("latent")
    if ct == "GlassKSampler":
        steps = _schedule(cost, nid, ct, int(inputs.get("steps", 20)), inputs.get("denoise", 1.0))
    elif ct == "GlassSample":
        steps = (facts.get("sigmas") or (None,))[0]
    elif ct == "GlassDenoiseSteps":
        steps = max(0, int(inputs.get("end_step", 1)) - int(inputs.get("start_step", 0)))
    else:  # GlassUNetPredict: one evaluation
        steps = 1
    if lat is not None:
        b, h, w = lat
        copies = 1 if _number(inputs.get("cfg", 7.5)) == 1.0 else 2
        _work_memory(cost, b * copies * h * w * UNET_BYTES_PER_LATENT_PIXEL, nid, ct, "latent_image",
                     f"the UNet on {b} x {copies} latents of {w}x{h}")
        if steps:
            work = float(b) * copies * h * w * steps
            cost.work += work
            cost.work_by.append((work, nid, ct, "steps" if ct == "GlassKSampler" else "latent_image",
                                 f"{steps} steps x batch {b} x {copies} guidance copies x {w}x{h} latent pixels"))
        cost.kept += _latent_bytes(lat) * (2 if ct != "GlassKSampler" else 1)
    return (lat, lat) if ct != "GlassKSampler" else (lat,)


def _text(nid, ct, inputs, facts, cost):
    text = inputs.get("text")
    if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
        cost.errors.append(GraphError("resource_budget", f"the prompt has {len(text):,} characters; at most "
                                                         f"{MAX_PROMPT_CHARS:,}", nid, ct, "text"))
    return (None,)


def _checkpoint(nid, ct, inputs, facts, cost):
    kind, key = ("vae", "vae_name") if ct == "GlassVAELoader" else ("checkpoints", "ckpt_name")
    try:
        from .loaders import checkpoint_path
        path = checkpoint_path(ct, inputs.get(key)) if kind == "checkpoints" else paths.full_path(kind, inputs.get(key))
        cost.kept += os.path.getsize(path) if path is not None else 0
    except Exception:
        pass
    return (None,) * (1 if kind == "vae" else 3)


ESTIMATORS: dict[str, Callable] = {
    "GlassEmptyLatent": _empty_latent, "GlassLatentUpscale": _latent_upscale, "GlassSetNoiseMask": _same_latent,
    "GlassLatentFromBatch": _from_batch, "GlassLoadImage": _load_image, "GlassVAEEncode": _vae_encode,
    "GlassVAEEncodeTiled": _vae_encode, "GlassVAEEncodeForInpaint": _vae_encode, "GlassVAEDecode": _vae_decode,
    "GlassVAEDecodeTiled": _vae_decode, "GlassScheduler": _scheduler, "GlassKSampler": _sampler,
    "GlassSample": _sampler, "GlassDenoiseSteps": _sampler, "GlassUNetPredict": _sampler, "GlassTextEncode": _text,
    "GlassCheckpointLoader": _checkpoint, "GlassVAELoader": _checkpoint,
}


def _number(v, default=1.0) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _schedule(cost, nid, ct, steps: int, denoise) -> int:
    """The sampling steps run; refuses a denoise that stretches the schedule past MAX_SCHEDULE_STEPS."""
    d = _number(denoise)
    if d <= 0 or not math.isfinite(d):
        return 0
    if d < 1:
        total = steps / d
        if total > MAX_SCHEDULE_STEPS:
            cost.errors.append(GraphError(
                "resource_budget", f"denoise {d:g} with {steps} steps builds a schedule of {total:,.0f} noise levels "
                                   f"(steps / denoise); at most {MAX_SCHEDULE_STEPS:,}: raise denoise or lower steps",
                nid, ct, "denoise"))
    return steps


def _work_memory(cost, nbytes, nid, ct, input_name, what):
    cost.working.append((float(nbytes), nid, ct, input_name, what))


# ----------------------------------------------------------------------------- limits

def free_memory() -> tuple[float, str]:
    """(bytes, where) the run may use: the GPU's free memory when the run goes to CUDA, else the system's
    available memory (MemAvailable)."""
    from .runtime import get_settings
    settings = get_settings()
    device = settings.device
    if device != "cpu" and paths.comfy_folder_paths() is None:
        try:
            import torch
            if torch.cuda.is_available() and (device == "auto" or device.startswith("cuda")):
                index = torch.device(device if device != "auto" else "cuda").index
                free, _ = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
                return float(free), "free GPU memory"
        except Exception:
            pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024, "available memory"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "available memory"
    except (ValueError, OSError, AttributeError):
        return math.inf, "memory"


def limits() -> tuple[float, str, float]:
    """(memory bytes, what that figure is, work) a graph may plan to use."""
    from .runtime import get_settings
    settings = get_settings()
    free, where = free_memory()
    memory = free
    if settings.max_memory_gb is not None and settings.max_memory_gb * GB < free:
        memory, where = settings.max_memory_gb * GB, "max_memory_gb ceiling (GLASS_DIFFUSION_MAX_MEMORY_GB)"
    return memory, where, float(settings.max_work)


def check_graph(api: dict, order: list[str], registry: Optional[dict] = None) -> list[GraphError]:
    """The budget errors of a valid graph (``order``: its nodes, sources before consumers)."""
    from .validation import is_link
    cost, facts = _Cost(), {}
    for nid in order:
        node = api[nid]
        fn = ESTIMATORS.get(node["class_type"])
        if fn is None:
            continue
        literal = {k: v for k, v in node["inputs"].items() if not is_link(v)}
        linked = {k: facts.get(str(v[0]), ())[v[1]] if v[1] < len(facts.get(str(v[0]), ())) else None
                  for k, v in node["inputs"].items() if is_link(v)}
        try:
            facts[nid] = fn(nid, node["class_type"], literal, linked, cost)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            facts[nid] = ()  # a value the node itself refuses at run time; no estimate
    errors = list(cost.errors)
    memory, where, max_work = limits()
    if cost.work > max_work:
        work, nid, ct, name, what = max(cost.work_by)
        errors.append(GraphError("resource_budget", f"asks for {cost.work:,.0f} units of sampling work ({what}"
                                                    f"{' and more' if len(cost.work_by) > 1 else ''}); the ceiling is "
                                                    f"{max_work:,.0f} (max_work, GLASS_DIFFUSION_MAX_WORK)",
                                 nid, ct, name))
    over = [w for w in cost.working if w[0] + cost.kept > memory] or (
        [(0.0, None, None, None, "its weights and outputs")] if cost.kept > memory else [])
    for nbytes, nid, ct, name, what in over:  # every node that cannot fit, each with its own figure
        errors.append(GraphError("resource_budget", f"needs about {(nbytes + cost.kept) / GB:,.1f} GB ({what}: "
                                                    f"{nbytes / GB:,.1f} GB, plus {cost.kept / GB:,.1f} GB of weights "
                                                    f"and outputs), more than the {memory / GB:,.1f} GB of {where}",
                                 nid, ct, name))
    return errors

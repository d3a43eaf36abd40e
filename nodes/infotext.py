"""AUTOMATIC1111's `parameters` text for saved PNGs (what image sites and A1111's "PNG Info" read).

    <prompt> <lora:name:weight> ...
    Negative prompt: <negative>
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512,
    Model hash: <sha256[:10]>, Model: <name>, Clip skip: 2, Lora hashes: "<name>: <hash[:12]>, ...", Version: ...

(one line after the negative prompt). Values holding ',', ':' or a newline are JSON-quoted, as A1111 quotes
them. Hashes as A1111 computes them: the model hash ("AutoV2") is the first 10 hex digits of the file's
sha256; a LoRA's hash is the first 12 hex digits of the sha256 of a .safetensors file's data after its
header (kohya's `sshs_model_hash` metadata when the file carries it), of the whole file for other formats.

The facts come from the API graph the image was made by: from the saving node up its `images` input to
the nearest sampler node, from there to the text encoders of `positive` / `negative`, and along `unet`
through LoRA loaders to the checkpoint loader. Anything that cannot be found (a prompt built by nodes that
are not ours, a sampler fed by custom sigmas) is left out, never guessed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

SAMPLER_NAMES = {  # ComfyUI / k-diffusion name -> A1111's
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "uni_pc": "UniPC", "lcm": "LCM", "restart": "Restart",
}
SCHEDULER_NAMES = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal",
    "linear_quadratic": "Linear Quadratic",
}
SAMPLER_NODES = ("GlassKSampler", "GlassSample", "GlassDenoiseSteps", "GlassAttentionMaps", "GlassStepFilm")
KSAMPLER_LIKE = ("GlassKSampler", "GlassAttentionMaps", "GlassStepFilm")  # KSampler's own input names
LORA_NODES = ("GlassLoraLoader", "GlassLoraLoaderModelOnly")
VERSION = "Glass Diffusion"
log = logging.getLogger(__name__)


def quote(value) -> str:
    text = str(value)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def _file_key(path: Path):
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime: int, after_header: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if after_header:
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hash(path) -> str:
    """A1111's model hash: sha256 of the whole file, first 10 hex digits."""
    return _sha256(*_file_key(Path(path)), False)[:10]


def lora_hash(path) -> str:
    """A1111's LoRA hash: sshs_model_hash metadata, else sha256 of a .safetensors file after its header (of the
    whole file otherwise), first 12 hex digits."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(n)).get("__metadata__") or {}
            if meta.get("sshs_model_hash"):
                return str(meta["sshs_model_hash"])[:12]
        except (OSError, ValueError):
            pass
        return _sha256(*_file_key(path), True)[:12]
    return _sha256(*_file_key(path), False)[:12]


# ------------------------------------------------------------------------------------------ graph walk
def _link(node: dict, name: str) -> Optional[str]:
    v = node.get("inputs", {}).get(name)
    return str(v[0]) if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int) else None


def _literal(node: dict, name: str):
    v = node.get("inputs", {}).get(name)
    return None if isinstance(v, list) else v


def _upstream(api: dict, start: Optional[str], want, through=None) -> Optional[str]:
    """Nearest node upstream of `start` (itself included) whose class is in `want` (breadth first)."""
    seen, queue = set(), [start] if start else []
    while queue:
        nid = queue.pop(0)
        if nid in seen or nid not in api:
            continue
        seen.add(nid)
        if api[nid].get("class_type") in want:
            return nid
        queue.extend(str(v[0]) for k, v in api[nid].get("inputs", {}).items()
                     if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int) and (through is None or k in through))
    return None


def _prompt_text(api: dict, cond_node: Optional[str]) -> Optional[str]:
    enc = _upstream(api, cond_node, ("GlassTextEncode",))
    return _literal(api[enc], "text") if enc else None


def _clip_skip(api: dict, cond_node: Optional[str]) -> Optional[int]:
    enc = _upstream(api, cond_node, ("GlassTextEncode",))
    skip = _upstream(api, _link(api[enc], "clip"), ("GlassClipSkip", "GlassCheckpointLoader")) if enc else None
    if skip and api[skip]["class_type"] == "GlassClipSkip":
        layer = _literal(api[skip], "stop_at_clip_layer")
        return -int(layer) if isinstance(layer, int) and layer < -1 else None
    return None


def _sampling(api: dict, sampler: str) -> dict:
    node, ct = api[sampler], api[sampler]["class_type"]
    out = {}
    if ct in KSAMPLER_LIKE:
        out = {k: _literal(node, k) for k in ("steps", "sampler_name", "scheduler", "cfg", "seed", "denoise")}
    else:
        out["seed"], out["cfg"] = _literal(node, "noise_seed"), _literal(node, "cfg")
        sel = _upstream(api, _link(node, "sampler"), ("GlassSamplerSelect",))
        if sel:
            out["sampler_name"] = _literal(api[sel], "sampler_name")
        sched = _upstream(api, _link(node, "sigmas"), ("GlassScheduler",))
        if sched:
            out.update(steps=_literal(api[sched], "steps"), scheduler=_literal(api[sched], "scheduler"),
                       denoise=_literal(api[sched], "denoise"))
    return {k: v for k, v in out.items() if v is not None}


def _model_chain(api: dict, unet_node: Optional[str]):
    """(checkpoint name or None, [(lora name, strength_model)] in the order applied)."""
    loras, nid = [], unet_node
    while nid in api:
        node = api[nid]
        ct = node.get("class_type")
        if ct in LORA_NODES:
            name, strength = _literal(node, "lora_name"), _literal(node, "strength_model")
            if isinstance(name, str) and strength != 0:
                loras.append((name, strength))
            nid = _link(node, "unet")
        elif ct == "GlassCheckpointLoader":
            return _literal(node, "ckpt_name"), loras[::-1]
        else:
            nid = _upstream(api, _link(node, "unet"), ("GlassCheckpointLoader",) + LORA_NODES)
    return None, loras[::-1]


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def a1111_parameters(api: Optional[dict], node_id: Optional[str], width: int, height: int) -> Optional[str]:
    """The `parameters` text for an image saved by node `node_id` of the API graph `api`; None when no
    sampler feeds it, or when a file to hash cannot be read (the image is saved without the chunk)."""
    try:
        return _parameters(api, node_id, width, height)
    except OSError as e:
        log.warning("no A1111 parameters chunk: %s", e)
        return None


def _parameters(api, node_id, width: int, height: int) -> Optional[str]:
    if not isinstance(api, dict) or node_id is None or str(node_id) not in api:
        return None
    sampler = _upstream(api, str(node_id), SAMPLER_NODES)
    if sampler is None:
        return None
    node = api[sampler]
    facts = _sampling(api, sampler)
    if node.get("class_type") == "GlassAttentionMaps":  # it encodes its prompt itself
        positive = _literal(node, "text") if isinstance(_literal(node, "text"), str) else ""
    else:
        positive = _prompt_text(api, _link(node, "positive")) or ""
    negative = _prompt_text(api, _link(node, "negative"))
    ckpt, loras = _model_chain(api, _link(node, "unet"))

    lora_hashes = []
    for name, strength in loras:
        path = _lora_path(name)
        alias = _stem(path.name if path is not None else name)  # A1111 names a LoRA by its file's stem
        positive += f" <lora:{alias}:{strength:g}>" if isinstance(strength, (int, float)) else ""
        if path is not None:
            lora_hashes.append(f"{alias}: {lora_hash(path)}")

    fields = [("Steps", facts.get("steps")),
              ("Sampler", SAMPLER_NAMES.get(facts.get("sampler_name"), facts.get("sampler_name"))),
              ("Schedule type", SCHEDULER_NAMES.get(facts.get("scheduler"), facts.get("scheduler"))),
              ("CFG scale", _num(facts.get("cfg"))), ("Seed", facts.get("seed")), ("Size", f"{width}x{height}")]
    if ckpt is not None:
        path = _checkpoint_path(ckpt)
        if path is not None:
            fields.append(("Model hash", model_hash(path)))
        fields.append(("Model", _stem(ckpt)))
    if facts.get("denoise") not in (None, 1, 1.0):
        fields.append(("Denoising strength", _num(facts["denoise"])))
    fields.append(("Clip skip", _clip_skip(api, _link(node, "positive"))))
    if lora_hashes:
        fields.append(("Lora hashes", ", ".join(lora_hashes)))
    fields.append(("Version", VERSION))
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields if v is not None)
    text = positive.strip()
    if negative is not None:
        text += f"\nNegative prompt: {negative.strip()}"
    return f"{text}\n{line}"


def _num(v):
    return f"{v:g}" if isinstance(v, float) else v


def _checkpoint_path(name: str) -> Optional[Path]:
    from .loaders import checkpoint_path
    from .types import NodeInputError
    try:
        return checkpoint_path("infotext", name)
    except NodeInputError:
        return None


def _lora_path(name: str) -> Optional[Path]:
    from .lora import lora_file
    return lora_file(name)

"""Checkpoint I/O for single-file checkpoints (`.safetensors`, `.ckpt`) of the families in `family.FAMILIES`.

Layout of a single-file checkpoint (the original LDM / CompVis names; SD 1.x shown):
    model.diffusion_model.*                   UNet
    first_stage_model.*                       VAE (encoder, decoder, quant_conv, post_quant_conv)
    cond_stage_model.transformer.text_model.* CLIP text encoder (Hugging Face names)
    betas, alphas_cumprod, ... (12 names)     DDPM schedule buffers (float32, [1000])
    model_ema.*                               EMA copies in full (non-pruned) files
`StableDiffusion` uses exactly the model names, so loading is structural: the file's family is detected
(`family.family_for`, which refuses other families naming the one the file looks like), its names go through
the family's short list of declared transforms, then into one `load_state_dict(strict=True, assign=True)`
on a model built on the meta device. There is no per-key table.

Transforms every file gets:
  1. `{"state_dict": {...}, "global_step": ...}` pickles are unwrapped.
  2. Ignored: `model_ema.*` (EMA copies, `model_ema.decay`, `model_ema.num_updates`), the 12 schedule
     buffers, and in standalone VAE files the loss network's `loss.*`.
  3. VAE mid-block attention weights stored as linear `[C, C]` are viewed as 1x1 convs `[C, C, 1, 1]`.
  4. Standalone VAE files: the `first_stage_model.` prefix is stripped when present.
The family's own (`ModelFamily.transforms`; SD 1.x): CLIP keys missing the `text_model.` level gain it;
`position_ids` missing are recreated as arange, stored as float they are rounded to int64. Saving applies
their inverses, so a saved file has the real layout.

Pickles are read only with `torch.load(weights_only=True)`: a pickle that needs anything else is refused
and nothing in it runs. The config comes from the safetensors metadata key `glass_diffusion.config`
(written by `save_checkpoint`) or is inferred from tensor shapes by the family (`ModelFamily.infer_config`:
its fixed facts such as head counts, 32 GroupNorm groups, the sizes from the shapes).
"""
import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .family import (SCHEDULE_KEYS, VAE, Entry, ModelFamily, detect_family, family_for, few, file_shape,  # noqa: F401
                     ignored, infer_vae_config)
from .model import SDConfig, StableDiffusion
from .schedules import schedule_buffers
from .vae import AutoencoderKL

CONFIG_METADATA_KEY = "glass_diffusion.config"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SHOW = 5  # keys listed in an error message


# ---------------------------------------------------------------------------------------------- reading

@contextlib.contextmanager
def _open_tensors(path: Path):
    """Yield ({name: Entry}, metadata) for a .safetensors file (memory-mapped) or a weights-only pickle."""
    if not path.exists():
        raise CheckpointError(path, "file not found")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        with _open_safetensors(path) as opened:
            yield opened
    elif suffix in PICKLE_SUFFIXES:
        yield _open_pickle(path), {}
    else:
        raise CheckpointError(path, f"unsupported file type {suffix!r}; expected .safetensors or one of "
                                    f"{', '.join(PICKLE_SUFFIXES)}")


@contextlib.contextmanager
def _open_safetensors(path: Path):
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            entries = {}
            for name in f.keys():
                view = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise CheckpointError(path, f"tensor {name} has unsupported dtype {view.get_dtype()}", [name])
                entries[name] = Entry(tuple(view.get_shape()), dtype, lambda name=name: f.get_tensor(name),
                                      fresh=False)  # safetensors 0.6+ hands out views of its file mapping
            yield entries, f.metadata() or {}
    except SafetensorError as e:
        what = "truncated (the header lists more data than the file holds)" if "not fully covered" in str(e) \
            else "not a safetensors file, or a corrupt one"
        raise CheckpointError(path, f"{what}: {e}") from None


def _open_pickle(path: Path) -> dict:
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"{len(bad)} entries are not tensors: {few(bad)}", bad)
    return {k: Entry(tuple(t.shape), t.dtype, lambda t=t: t, fresh=False) for k, t in obj.items()}


def _torch_load(path: Path):
    """torch.load restricted to tensors and plain containers; memory-mapped when the format allows."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (non-zip) format cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only: no error here can come from code in the file, none ran
        raise CheckpointError(path, _pickle_problem(e)) from None


def _pickle_problem(e: Exception) -> str:
    text = str(e)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (f"refused: this pickle needs {refused.group(1)} to load, more than tensors and plain containers "
                "(weights_only=True; nothing in it was run). Convert it to .safetensors with a tool you trust")
    detail = f"{type(e).__name__}: {_unpickler_detail(text) or type(e).__name__}"
    if isinstance(e, EOFError) or "zip archive" in text:
        return f"truncated or corrupt checkpoint ({detail})"
    return f"not a PyTorch checkpoint, or a corrupt one ({detail})"


def _unpickler_detail(text: str) -> str:
    """The informative part of a torch.load error, past its weights_only boilerplate."""
    text = text.split("WeightsUnpickler error:")[-1]
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    useful = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
    return useful[0].splitlines()[0] if useful else ""


# ---------------------------------------------------------------------------------------------- key transforms

def _model_entries(path, raw: dict, family: ModelFamily) -> dict:
    """The ignored keys dropped, then the family's declared transforms in order."""
    entries = {name: entry for name, entry in raw.items() if not ignored(name)}
    for transform in family.transforms:
        entries = transform.apply(path, entries)
    return entries


def _vae_entries(path, raw: dict) -> dict:
    """Transforms 2 and 6 for a standalone VAE (or the VAE part of a full checkpoint)."""
    if any(k.startswith(VAE) for k in raw):
        entries = {k[len(VAE):]: e for k, e in raw.items() if k.startswith(VAE)}
    else:
        entries = {k: e for k, e in raw.items() if not (ignored(k) or k.startswith("loss."))}
    if "encoder.conv_in.weight" not in entries:
        raise CheckpointError(path, "not a VAE: no encoder.conv_in.weight (or first_stage_model.encoder."
                                    f"conv_in.weight); first keys: {few(sorted(raw))}")
    return entries


# ---------------------------------------------------------------------------------------------- config

def _metadata_config(path, metadata: Mapping):
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        return SDConfig.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise CheckpointError(path, f"metadata {CONFIG_METADATA_KEY} is not a valid SDConfig: {e}") from None


def infer_config(shapes: Mapping, path="<state dict>") -> SDConfig:
    """SDConfig from a checkpoint's {name: shape} (model names, as after the declared transforms), by the
    detected family's rules."""
    return family_for(path, shapes).infer_config(shapes, path)


# ---------------------------------------------------------------------------------------------- sanity checks
# A file's metadata and tensors are checked before anything is built from them: the config comes from the
# tensor shapes wherever they decide it (metadata values there are only a cross-check), every other value must
# lie in a sane range, weights must have a float dtype, and index tensors (position_ids) must be in range.

_LIMITS = {"model_channels": 16384, "channel_mult": 8, "num_res_blocks": 16, "transformer_depth": 64,
           "context_dim": 16384, "in_channels": 64, "out_channels": 64, "vocab_size": 1 << 20, "max_positions": 4096,
           "width": 16384, "layers": 128, "mlp_width": 65536, "image_channels": 16, "latent_channels": 64,
           "base_channels": 4096}
_FROM_SHAPES = {"unet": ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                         "attention_levels", "transformer_depth", "context_dim", "use_linear_proj",
                         "transformer_depth_middle"),
                "clip": ("vocab_size", "max_positions", "width", "layers", "mlp_width"),
                "vae": ("image_channels", "latent_channels", "base_channels", "channel_mult", "num_res_blocks")}
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8) + _WEIGHT_DTYPES


def checked_config(path, config, entries: Mapping, vae_only: bool = False, family: ModelFamily = None):
    """The config to build: the tensor shapes' (inferred, by the family's rules) values, the metadata's
    ``config`` for what shapes do not decide (heads, groups, eps, token ids, latent scale), every value checked.
    CheckpointError naming the file and the value otherwise. ``vae_only``: entries are a standalone VAE's;
    returns a VAEConfig."""
    try:
        if vae_only:
            inferred = {"vae": infer_vae_config(entries, "", path)}
        else:
            shaped = family.infer_config(entries, path)
            inferred = {"unet": shaped.unet, "clip": shaped.clip, "vae": shaped.vae}
    except (ZeroDivisionError, IndexError, ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(path, f"the tensor shapes give no usable config ({type(e).__name__}: {e})") from None
    given = None if config is None else ({"vae": config.vae} if vae_only else
                                         {"unet": config.unet, "clip": config.clip, "vae": config.vae})
    if given is not None and not vae_only and type(given["clip"]) is not type(inferred["clip"]):
        raise CheckpointError(path, f"metadata {CONFIG_METADATA_KEY} describes a {type(given['clip']).__name__} text "
                                    f"encoder, the file holds the {family.label} one ({family.text[0].encoder})")
    parts = {}
    for part, shaped in inferred.items():
        for name in _FROM_SHAPES[part]:
            value = getattr(shaped, name)
            bound = _LIMITS.get(name)
            sized = len(value) if isinstance(value, tuple) else value
            if bound is not None and not 1 <= sized <= bound:
                raise CheckpointError(path, f"the tensor shapes give {part} {name} = {value!r}, outside 1..{bound}")
            lowest = 0 if name in ("attention_levels", "transformer_depth") else 1  # depth 0: a level without attention
            if isinstance(value, tuple) and any(not isinstance(v, int) or v < lowest or v > 64 for v in value):
                raise CheckpointError(path, f"the tensor shapes give {part} {name} = {value!r}")
        if given is None:
            parts[part] = shaped
            continue
        try:  # shapes win; the rest comes from the metadata
            parts[part] = replace(given[part], **{n: getattr(shaped, n) for n in _FROM_SHAPES[part]})
        except (TypeError, ValueError) as e:
            raise CheckpointError(path, f"metadata {CONFIG_METADATA_KEY} is not a valid config: {e}") from None
    _check_free_values(path, parts)
    return parts["vae"] if vae_only else SDConfig(unet=parts["unet"], clip=parts["clip"], vae=parts["vae"])


def _check_free_values(path, parts: dict) -> None:
    """Ranges of the values the shapes do not decide (they may come from a file's metadata)."""
    def need(ok, part, name, value, rule):
        if not ok:
            raise CheckpointError(path, f"{part} {name} = {value!r} is not usable: it must be {rule}")

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if "unet" in parts:
        u = parts["unet"]
        channels = [u.model_channels * m for m in u.channel_mult]
        need(count(u.num_heads) and all(c % u.num_heads == 0 for c in channels), "unet", "num_heads", u.num_heads,
             f"an integer >= 1 dividing every level's channels {channels}")
        need(u.head_dim is None or (count(u.head_dim) and all(c % u.head_dim == 0 for c in channels)), "unet",
             "head_dim", u.head_dim, f"None or an integer >= 1 dividing every level's channels {channels}")
        need(count(u.norm_groups) and all(c % u.norm_groups == 0 for c in channels), "unet", "norm_groups",
             u.norm_groups, f"an integer >= 1 dividing every level's channels {channels}")
        need(all(0 <= a < len(u.channel_mult) for a in u.attention_levels), "unet", "attention_levels",
             u.attention_levels, f"level numbers below {len(u.channel_mult)}")
    if "clip" in parts:
        c = parts["clip"]
        need(count(c.heads) and c.width % c.heads == 0, "clip", "heads", c.heads,
             f"an integer >= 1 dividing the width {c.width}")
        need(isinstance(c.eps, (int, float)) and not isinstance(c.eps, bool) and 0 < c.eps < 1, "clip", "eps",
             c.eps, "a number in (0, 1)")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(c, name)
            need(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < c.vocab_size, "clip", name, v,
                 f"a token id in 0..{c.vocab_size - 1}")
    v = parts["vae"]
    channels = [v.base_channels * m for m in v.channel_mult]
    need(count(v.norm_groups) and all(ch % v.norm_groups == 0 for ch in channels), "vae", "norm_groups",
         v.norm_groups, f"an integer >= 1 dividing every level's channels {channels}")
    sf = v.scaling_factor
    need(isinstance(sf, (int, float)) and not isinstance(sf, bool) and math.isfinite(sf) and 0 < sf <= 100, "vae",
         "scaling_factor", sf, "a finite number in (0, 100]")


def check_tensors(path, tensors: Mapping, config=None, values: bool = False) -> None:
    """Weights must have a float dtype we compute in (int8 or bool weights are refused, naming the keys);
    with ``values``, index tensors (position_ids) must hold whole numbers in 0..max_positions-1."""
    if not values:
        bad = [k for k, e in tensors.items()
               if e.dtype not in (_INDEX_DTYPES if k.endswith("position_ids") else _WEIGHT_DTYPES)]
        if bad:
            found = sorted({str(tensors[k].dtype).removeprefix("torch.") for k in bad})
            raise CheckpointError(path, f"{len(bad)} tensors have a dtype the model cannot use ({', '.join(found)}; "
                                        f"weights must be float16, bfloat16, float32 or float64): {few(bad)}", bad)
        return
    limit = getattr(getattr(config, "clip", None), "max_positions", None)
    for k, t in tensors.items():
        if k.endswith("position_ids") and t.numel() and limit is not None:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= limit:
                raise CheckpointError(path, f"{k} holds positions {lo}..{hi}, outside 0..{limit - 1}", [k])


# ---------------------------------------------------------------------------------------------- loading

def load_checkpoint(path, device="cpu", dtype=None) -> StableDiffusion:
    """Load a single-file checkpoint of a family in `family.FAMILIES` (others are refused, naming the family
    they look like). The model's `.family` is the detected row. dtype None keeps the file's float dtype."""
    path = Path(path)
    with _open_tensors(path) as (raw, metadata):
        family = family_for(path, raw, lambda name: raw[name].read())
        entries = _model_entries(path, raw, family)
        config = checked_config(path, _metadata_config(path, metadata), entries, family=family)
        with torch.device("meta"):  # no memory, no random init
            model = StableDiffusion(config, family)
        _load_into(path, model, entries, device, dtype)
    return model.eval()


def load_vae(path, device="cpu", dtype=None) -> AutoencoderKL:
    """Load a standalone VAE file (keys with or without first_stage_model., maybe loss.*), or the VAE of a
    full checkpoint."""
    path = Path(path)
    with _open_tensors(path) as (raw, metadata):
        entries = _vae_entries(path, raw)
        full = _metadata_config(path, metadata)
        config = checked_config(path, full, entries, vae_only=True)
        with torch.device("meta"):
            model = AutoencoderKL(config)
        _load_into(path, model, entries, device, dtype)
    return model.eval()


def _load_into(path, model: torch.nn.Module, entries: dict, device, dtype) -> None:
    """Check names and shapes, then convert tensor by tensor straight to device/dtype and assign."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(path, expected, entries)
    check_tensors(path, {k: entries[k] for k in expected}, getattr(model, "config", None))
    dtype = dtype or _file_float_dtype(entries)
    state = {k: _convert(k, entries[k], expected[k], device, dtype) for k in expected}
    check_tensors(path, state, getattr(model, "config", None), values=True)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(path, f"{len(left)} model tensors are not in the state dict (non-persistent "
                                    f"buffers?): {few(left)}", left)


def _check_keys(path, expected: dict, entries: dict) -> None:
    found = {k: file_shape(k, e.shape) for k, e in entries.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} keys with the wrong shape: " + "; ".join(
            f"{k} expected {list(expected[k])}, found {list(found[k])}" for k in wrong[:_SHOW])
            + ("; ..." if len(wrong) > _SHOW else ""))
    if problems:
        raise CheckpointError(path, "does not match the model: " + " | ".join(problems),
                              missing + unexpected + wrong)


def _file_float_dtype(entries: dict) -> torch.dtype:
    """The float dtype holding most of the file's elements (what dtype=None keeps)."""
    totals = {}
    for e in entries.values():
        if e.dtype.is_floating_point:
            totals[e.dtype] = totals.get(e.dtype, 0) + math.prod(e.shape)
    return max(totals, key=totals.get) if totals else torch.float32


def _convert(name: str, entry: Entry, shape: tuple, device, dtype) -> torch.Tensor:
    src = entry.read()
    if name.endswith("position_ids"):
        t = (src.round() if src.is_floating_point() else src).to(device=device, dtype=torch.int64)
    else:
        t = src.to(device=device, dtype=dtype if src.is_floating_point() else src.dtype)
    if t is src and not entry.fresh:
        t = t.clone()  # own the memory rather than keep the pickle's file mapping alive
    return t.reshape(shape) if tuple(t.shape) != shape else t


# ---------------------------------------------------------------------------------------------- saving

def save_checkpoint(model: StableDiffusion, path, dtype=torch.float16, overwrite=False, metadata=None) -> Path:
    """Write `model` as a single-file .safetensors of its family (model keys through the family's inverse
    transforms, int64 position_ids, the 12 schedule buffers, config JSON in metadata). Atomic: a temp file in
    the same folder, then os.replace. dtype None keeps the model's dtype."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: save_checkpoint writes .safetensors files only")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    state = model.state_dict()
    for transform in reversed(model.family.transforms):
        state = transform.inverse(state)
    tensors = {k: _for_saving(k, t, dtype) for k, t in state.items()}
    tensors.update(schedule_buffers(model.family.schedule))
    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    _atomic_save_file(tensors, path, {**extra, "format": "pt",
                                      CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())})
    return path


def _for_saving(name: str, t: torch.Tensor, dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    if name.endswith("position_ids"):
        return t.round().to(torch.int64).contiguous() if t.is_floating_point() else t.to(torch.int64).contiguous()
    if t.is_floating_point() and dtype is not None:
        t = t.to(dtype)
    return t.contiguous()


def _atomic_save_file(tensors: dict, path: Path, metadata: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600; the saved file gets the usual umask-based mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- helpers

def _read_umask() -> int:
    """The process umask, read once at import (from /proc where shown, else set and restored once then),
    never toggled while other threads may be creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_NEW_FILE_MODE = 0o666 & ~_read_umask()


def _new_file_mode() -> int:
    """The mode open() would give a new file: 0666 minus the process umask (as read at import)."""
    return _NEW_FILE_MODE

"""Model families: every fact that differs between kinds of Stable Diffusion checkpoint, in one frozen record each.

A `ModelFamily` row holds
- `detect(view)`: does a state dict (names, shapes, and for some rows a tensor's values) belong to this family?
  It returns the evidence (a short text naming the key that decided it) or None; errors quote the evidence;
- `transforms`: the declared key transforms between the file's names and the model's (no per-key tables);
- `infer_config(shapes, path)`: the network config from tensor shapes (the family's fixed facts, such as head
  counts, come from the row, the sizes from the shapes);
- `prediction` and `schedule`: what the UNet predicts and its training noise schedule, which give the
  `ModelSampling` (`family.model_sampling()`);
- `latent`: its `LatentFormat` (channels, scale factor, RGB preview matrix, blank latent for 9-channel inpainting);
- `text`: its text-conditioning recipe(s) (`TextRecipe`: encoder, checkpoint prefix, tokenizer, pad id,
  default layer, pooled output); a tuple, since a family may condition on more than one encoder;
- `unet_in_channels`: 4, or 9 for inpainting models (latent + mask + masked-image latent).

`FAMILIES` lists the rows Glass Diffusion loads, in detection order (SD 1.x, SD 1.x inpainting, SD 2.x 768-v,
SD 2.x 512, SD 2.x inpainting); `LOOKALIKES` the families it recognises and refuses (SDXL, SD 3, Flux).
`detect(entries)` returns the first row (or look-alike) that matches.

SD 2.x is told from SD 1.x by its OpenCLIP text encoder (`cond_stage_model.model.*`), a 1024-wide cross-attention
context or linear `proj_in` weights; 768-v from 512-base as ComfyUI does it (the population std of
`output_blocks.11.1.transformer_blocks.0.norm1.bias` above 0.09 means v-prediction; 9-channel files are eps).
A wrong guess is fixed by a sampling override (ModelSamplingDiscrete), as in ComfyUI.

What an SDXL row would add: a second `TextRecipe` (CLIP-L penultimate + OpenCLIP bigG penultimate, concatenated
to 2048 wide, the bigG pooled vector projected), a vector-conditioning recipe for the UNet's `y` (pooled text +
size / crop embeddings into `label_emb`), its own `LatentFormat` (scale 0.13025, other preview factors) and
`infer_config` (three levels, transformer depths 0 / 2 / 10); the fields are there, the network parts are not.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from .clip import CLIPTextConfig
from .errors import CheckpointError
from .model import SDConfig
from .open_clip import OpenCLIPTextConfig
from .schedules import ModelSampling, Schedule
from .unet import UNetConfig
from .vae import VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_ROOT = "cond_stage_model.transformer."
CLIP = CLIP_ROOT + "text_model."
POSITION_IDS = CLIP + "embeddings.position_ids"
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14's text tower
V_PREDICTION_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PREDICTION_STD = 0.09  # ComfyUI's threshold: std above it -> v-prediction
_SHOW = 5  # keys listed in an error message
_VAE_ATTN_WEIGHT = re.compile(r"(^|\.)mid\.attn_1\.(q|k|v|proj_out)\.weight$")


# ---------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Entry:
    """One tensor of a file, readable on demand (so a whole state dict is never materialised)."""
    shape: tuple
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    fresh: bool = True  # read() returns a new tensor; False: it may be a view of the file's mapping (pickles, safetensors)


@dataclass(frozen=True)
class LatentFormat:
    """How a family's latents look. LATENTs between nodes are unscaled; sampling multiplies by scale_factor."""
    channels: int
    scale_factor: float
    rgb_factors: tuple     # channels x 3: preview rgb = scaled latent @ rgb_factors (a published linear fit)
    blank_inpaint: tuple   # the scaled latent of an all-grey image: a 9-channel model's masked image without a mask

    def preview_rgb(self, x0: torch.Tensor) -> torch.Tensor:
        """Scaled latent [C, h, w] -> RGB [h, w, 3] in about -1..1."""
        m = torch.tensor(self.rgb_factors, dtype=x0.dtype, device=x0.device)  # (C, 3)
        return torch.einsum("chw,cr->hwr", x0, m)  # (C, h, w) -> (h, w, 3)

    def blank_inpaint_like(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] filled per channel with the blank (grey image) latent."""
        blank = torch.tensor(self.blank_inpaint, dtype=latent.dtype, device=latent.device)
        return blank.view(1, -1, 1, 1).expand_as(latent)


@dataclass(frozen=True)
class TextRecipe:
    """One text encoder of a family and how a prompt goes through it."""
    encoder: str                  # "clip-l" (CLIP ViT-L/14 in Hugging Face names), "open-clip-h" (ViT-H/14, LDM names)
    prefix: str                   # the encoder's checkpoint prefix
    tokenizer: str = "clip-bpe"   # CLIP's 49408-token byte-level BPE
    pad_id: Optional[int] = None  # None: pad with the end token (SD 1.x); else this id
    default_layer: int = -1       # the layer read when no clip skip is set: -1 last, -2 penultimate
    pooled: bool = True           # the encoder's pooled vector goes into the CONDITIONING


@dataclass(frozen=True)
class KeyTransform:
    """A declared difference between a file's keys and the model's: `apply(path, entries) -> entries`
    (file -> model, on lazily read entries) and `inverse(state) -> state` (model -> file, for saving)."""
    name: str
    apply: Callable[[object, dict], dict]
    inverse: Callable[[dict], dict] = lambda state: state


@dataclass(frozen=True)
class ModelFamily:
    name: str                    # "sd1", "sd1-inpaint", ...: short, stable (metadata, errors)
    label: str                   # "SD 1.x inpainting" in messages
    line: str                    # the model line the row belongs to: "SD 1.x"
    prediction: str              # "eps" | "v": what the UNet outputs
    schedule: Schedule
    latent: LatentFormat
    text: tuple                  # TextRecipe per encoder, in concatenation order
    unet_in_channels: int        # 4, or latent.channels + 5 for inpainting
    detect: Callable[["StateView"], Optional[str]] = field(repr=False)
    infer_config: Callable[[Mapping, object], SDConfig] = field(repr=False)
    transforms: tuple = ()       # KeyTransform, applied in order after the ignored keys are dropped

    def model_sampling(self) -> ModelSampling:
        return ModelSampling(self.schedule, self.prediction)

    @property
    def is_inpaint(self) -> bool:
        return self.unet_in_channels == self.latent.channels + 5

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"ModelFamily({self.name})"


@dataclass(frozen=True)
class LookAlike:
    """A family Glass Diffusion recognises but does not load: refused with its name and the evidence."""
    name: str
    label: str
    detect: Callable[["StateView"], Optional[str]] = field(repr=False)


class StateView:
    """What detection may look at: names, shapes, and (when the caller has them) tensor values."""

    def __init__(self, keys, read: Optional[Callable[[str], torch.Tensor]] = None):
        if isinstance(keys, Mapping):
            self.shapes = {k: _shape(v) for k, v in keys.items()}
            if read is None and any(torch.is_tensor(v) for v in keys.values()):
                read = lambda k: keys[k]  # noqa: E731
        else:
            self.shapes = dict.fromkeys(keys)
        self.names = list(self.shapes)
        self._read = read

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.names)

    def shape(self, name: str):
        return self.shapes.get(name)

    def tensor(self, name: str) -> Optional[torch.Tensor]:
        """The tensor's values, or None when only names / shapes are known."""
        if self._read is None or name not in self.shapes:
            return None
        return self._read(name)


def _shape(v):
    if v is None:
        return None
    if hasattr(v, "shape"):
        return tuple(v.shape)
    return tuple(v)


# ---------------------------------------------------------------------------------------------- SD 1.x

# the LDM class keeps a few more tensors than the model: EMA copies and the DDPM schedule buffers
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


def ignored(name: str) -> bool:
    """Keys of a full checkpoint that are not model weights (every family)."""
    return name.startswith("model_ema.") or name in SCHEDULE_KEYS


def _add_text_model_level(path, entries: dict) -> dict:
    """CLIP keys missing the `text_model.` level (`cond_stage_model.transformer.embeddings...`) gain it."""
    out = {}
    for name, entry in entries.items():
        if name.startswith(CLIP_ROOT) and not name.startswith(CLIP):
            name = CLIP + name[len(CLIP_ROOT):]
        if name in out:
            raise CheckpointError(path, f"key {name} appears twice (with and without text_model.)", [name])
        out[name] = entry
    return out


def _position_ids(path, entries: dict) -> dict:
    """`position_ids` missing: recreated as arange (stored as float: rounded to int64 when converted)."""
    pos = entries.get(CLIP + "embeddings.position_embedding.weight")
    if POSITION_IDS not in entries and pos is not None:
        n = pos.shape[0]
        entries = {**entries, POSITION_IDS: Entry((1, n), torch.int64, lambda: torch.arange(n).unsqueeze(0))}
    return entries


CLIP_TEXT_LEVEL = KeyTransform("CLIP keys without text_model. gain it", _add_text_model_level)
CLIP_POSITION_IDS = KeyTransform("missing CLIP position_ids recreated", _position_ids)

SD_SCHEDULE = Schedule(timesteps=1000, linear_start=0.00085, linear_end=0.012)  # SD 1.x and 2.x
# ComfyUI's published SD 1.x latent -> RGB fit, and the latent of a grey image
SD1_LATENT = LatentFormat(
    channels=4, scale_factor=0.18215,
    rgb_factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                 (-0.2120, -0.2616, -0.7177)),
    blank_inpaint=(0.8223, -0.6876, 0.6364, 0.1380))
CLIP_L = TextRecipe(encoder="clip-l", prefix=CLIP_ROOT, pad_id=None, default_layer=-1, pooled=True)


def _sd1_text_and_unet(view: StateView) -> Optional[str]:
    if view.has_prefix(UNET) and view.has_prefix(CLIP_ROOT) and not _sd2_evidence(view):
        return f"{UNET}* with {CLIP_ROOT}*"
    return None


def _in_channels(view: StateView) -> Optional[int]:
    conv_in = view.shape(UNET + "input_blocks.0.0.weight")
    return conv_in[1] if conv_in is not None and len(conv_in) == 4 else None


def _detect_sd1(view: StateView) -> Optional[str]:
    evidence = _sd1_text_and_unet(view)
    return evidence if evidence and _in_channels(view) != 9 else None


def _detect_sd1_inpaint(view: StateView) -> Optional[str]:
    evidence = _sd1_text_and_unet(view)
    return "9 UNet input channels" if evidence and _in_channels(view) == 9 else None


def infer_sd1_config(shapes: Mapping, path="<state dict>") -> SDConfig:
    """SDConfig from a checkpoint's {name: shape} (model names), with SD 1.x's 8 UNet heads."""
    return SDConfig(unet=infer_unet_config(shapes, path=path), clip=infer_clip_config(shapes, path=path),
                    vae=infer_vae_config(shapes, VAE, path=path))


SD1 = ModelFamily(
    name="sd1", label="SD 1.x", line="SD 1.x", prediction="eps", schedule=SD_SCHEDULE, latent=SD1_LATENT,
    text=(CLIP_L,), unet_in_channels=4, detect=_detect_sd1, infer_config=infer_sd1_config,
    transforms=(CLIP_TEXT_LEVEL, CLIP_POSITION_IDS))
SD1_INPAINT = ModelFamily(
    name="sd1-inpaint", label="SD 1.x inpainting", line="SD 1.x", prediction="eps", schedule=SD_SCHEDULE,
    latent=SD1_LATENT, text=(CLIP_L,), unet_in_channels=9, detect=_detect_sd1_inpaint,
    infer_config=infer_sd1_config, transforms=(CLIP_TEXT_LEVEL, CLIP_POSITION_IDS))


# ---------------------------------------------------------------------------------------------- SD 2.x

def _linear_proj(view: StateView) -> Optional[str]:
    for k in view.names:
        s = view.shapes[k]
        if k.startswith(UNET) and k.endswith("proj_in.weight") and s is not None and len(s) == 2:
            return k
    return None


def _sd2_evidence(view: StateView) -> Optional[str]:
    """Why a file with a UNet is SD 2.x (and not SD 1.x), or None."""
    if not view.has_prefix(UNET):
        return None
    if view.has_prefix(OPEN_CLIP):
        return f"{OPEN_CLIP}* (OpenCLIP text encoder)"
    to_k = view.shape(UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and len(to_k) == 2 and to_k[1] == 1024:
        return "context width 1024 (middle_block.1.transformer_blocks.0.attn2.to_k.weight)"
    linear = _linear_proj(view)
    return f"linear {linear}" if linear else None


def _v_prediction_std(view: StateView) -> Optional[float]:
    t = view.tensor(V_PREDICTION_KEY)
    return None if t is None else float(t.double().std(unbiased=False))


def _detect_sd2_v(view: StateView) -> Optional[str]:
    evidence = _sd2_evidence(view)
    if not evidence or _in_channels(view) not in (None, 4):
        return None
    std = _v_prediction_std(view)
    if std is None or not std > V_PREDICTION_STD:
        return None
    return f"{evidence}; std of {V_PREDICTION_KEY} = {std:.3f} > {V_PREDICTION_STD}: v-prediction"


def _detect_sd2(view: StateView) -> Optional[str]:
    evidence = _sd2_evidence(view)
    if not evidence or _in_channels(view) not in (None, 4):
        return None
    std = _v_prediction_std(view)
    why = f"no {V_PREDICTION_KEY} values" if std is None else \
        f"std of {V_PREDICTION_KEY} = {std:.3f} <= {V_PREDICTION_STD}"
    return f"{evidence}; {why}: eps-prediction"


def _detect_sd2_inpaint(view: StateView) -> Optional[str]:
    evidence = _sd2_evidence(view)
    return f"{evidence}; 9 UNet input channels" if evidence and _in_channels(view) == 9 else None


def _detect_sd2_other(view: StateView) -> Optional[str]:
    """SD 2.x UNets with other input channels: depth-to-image (5), the x4 upscaler (7)."""
    evidence = _sd2_evidence(view)
    channels = _in_channels(view)
    return f"{evidence}; {channels} UNet input channels" if evidence and channels not in (None, 4, 9) else None


def infer_sd2_config(shapes: Mapping, path="<state dict>") -> SDConfig:
    """SDConfig from shapes with SD 2.x's 64-channel heads and fp32 attention; the OpenCLIP text encoder's."""
    if not any(k.startswith(OPEN_CLIP) for k in shapes):
        raise CheckpointError(path, f"has an SD 2.x UNet but no {OPEN_CLIP}* (OpenCLIP) text encoder; first keys: "
                                    f"{few(sorted(k for k in shapes if not k.startswith(UNET)))}")
    return SDConfig(unet=infer_unet_config(shapes, path=path, head_dim=64, attention_fp32=True),
                    clip=infer_open_clip_config(shapes, path=path), vae=infer_vae_config(shapes, VAE, path=path))


def _logit_scale(path, entries: dict) -> dict:
    """`logit_scale` (CLIP's contrastive temperature, unused by conditioning) missing: recreated as log(100)."""
    key = OPEN_CLIP + "logit_scale"
    if key not in entries and any(k.startswith(OPEN_CLIP) for k in entries):
        entries = {**entries, key: Entry((), torch.float32, lambda: torch.tensor(math.log(100.0)))}
    return entries


OPEN_CLIP_LOGIT_SCALE = KeyTransform("missing OpenCLIP logit_scale recreated", _logit_scale)
# pad with 0, read the penultimate layer; the pooled vector goes through text_projection
OPEN_CLIP_H = TextRecipe(encoder="open-clip-h", prefix=OPEN_CLIP, pad_id=0, default_layer=-2, pooled=True)


def _sd2_row(name: str, label: str, prediction: str, in_channels: int, detect) -> ModelFamily:
    return ModelFamily(name=name, label=label, line="SD 2.x", prediction=prediction, schedule=SD_SCHEDULE,
                       latent=SD1_LATENT, text=(OPEN_CLIP_H,), unet_in_channels=in_channels, detect=detect,
                       infer_config=infer_sd2_config, transforms=(OPEN_CLIP_LOGIT_SCALE,))


SD2 = _sd2_row("sd2", "SD 2.x 512", "eps", 4, _detect_sd2)
SD2_V = _sd2_row("sd2-v", "SD 2.x 768-v", "v", 4, _detect_sd2_v)
SD2_INPAINT = _sd2_row("sd2-inpaint", "SD 2.x inpainting", "eps", 9, _detect_sd2_inpaint)


# ---------------------------------------------------------------------------------------------- look-alikes

def _detect_prefix(prefix: str) -> Callable[[StateView], Optional[str]]:
    def detect(view: StateView) -> Optional[str]:
        return f"{prefix}*" if view.has_prefix(prefix) else None
    return detect


def _detect_part(part: str) -> Callable[[StateView], Optional[str]]:
    """Keys with `part` after an optional prefix (diffusion-transformer files come with and without one)."""
    def detect(view: StateView) -> Optional[str]:
        hit = next((k for k in view.names if k.startswith(part) or f".{part}" in k), None)
        return hit if hit else None
    return detect


LOOKALIKES = (
    LookAlike("sdxl", "SDXL", _detect_prefix("conditioner.embedders.")),
    LookAlike("sd3", "SD 3", _detect_part("joint_blocks.")),
    LookAlike("flux", "Flux", _detect_part("double_blocks.")),
    LookAlike("sd2-other", "SD 2.x depth or upscaler", _detect_sd2_other),
)

FAMILIES = (SD1, SD1_INPAINT, SD2_V, SD2, SD2_INPAINT)


# ---------------------------------------------------------------------------------------------- detection

def detect(keys, read: Optional[Callable[[str], torch.Tensor]] = None) -> tuple:
    """(family or LookAlike or None, evidence) for a state dict's keys: a mapping name -> tensor / shape, or
    names only. `read(name)` gives tensor values to rows that need them."""
    view = keys if isinstance(keys, StateView) else StateView(keys, read)
    for row in (*LOOKALIKES, *FAMILIES):
        evidence = row.detect(view)
        if evidence:
            return row, evidence
    return None, _unknown_hint(view)


def detect_family(keys) -> str:
    """The family name ('sd1', 'sd1-inpaint', 'sd2', 'sdxl', ...) or 'unknown', from key names (a mapping
    name -> tensor or shape also lets it see shapes)."""
    row, _ = detect(keys)
    return row.name if row is not None else "unknown"


def family_for(path, keys, read=None) -> ModelFamily:
    """The loadable family of a checkpoint, or CheckpointError naming what it looks like and why."""
    row, evidence = detect(keys, read)
    if isinstance(row, ModelFamily):
        return row
    what = f"an {row.label}" if row is not None and row.label[0] in "AEIOS" else \
        f"a {row.label}" if row is not None else "an unknown kind of"
    loads = " and ".join(dict.fromkeys(f.line for f in FAMILIES))
    raise CheckpointError(path, f"looks like {what} checkpoint (found {evidence}); Glass Diffusion loads {loads} only")


def family_named(name: str) -> ModelFamily:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown model family {name!r}; known: {[f.name for f in FAMILIES]}")


TEXT_CONFIGS = {"clip-l": CLIPTextConfig, "open-clip-h": OpenCLIPTextConfig}  # TextRecipe.encoder -> config


def family_of_config(config: SDConfig) -> ModelFamily:
    """The family a network config belongs to by structure alone (for models built in code, not loaded); an SD 2.x
    4-channel config is 512-eps or 768-v by its weights, not its structure: pass the family."""
    matches = [f for f in FAMILIES if f.unet_in_channels == config.unet.in_channels
               and isinstance(config.clip, TEXT_CONFIGS[f.text[0].encoder])]
    if len(matches) != 1:
        raise ValueError(f"cannot tell the model family of this config ({len(matches)} candidates); pass family=")
    return matches[0]


def _unknown_hint(view: StateView) -> str:
    names = view.names
    has_unet = view.has_prefix(UNET)
    if has_unet:
        return f"a UNet but no {CLIP_ROOT}* text encoder"
    if view.has_prefix(VAE) or view.has_prefix("encoder.conv_in"):
        return "VAE keys only: a standalone VAE, load it with load_vae"
    if any(".down_blocks." in k or k.startswith("down_blocks.") or k.startswith("text_model.") for k in names):
        return "diffusers-style names (down_blocks / text_model.*), not the single-file layout"
    return f"no {UNET}* keys; first keys: {few(sorted(names))}"


# ---------------------------------------------------------------------------------------------- config inference

def file_shape(name: str, shape: tuple) -> tuple:
    """The shape a file tensor takes in the model (VAE mid-block attention stored linear [C, C] -> 1x1 conv)."""
    if len(shape) == 2 and _VAE_ATTN_WEIGHT.search(name):
        return shape + (1, 1)
    return shape


def infer_unet_config(shapes: Mapping, prefix: str = UNET, path="<state dict>", *, num_heads: int = 8,
                      head_dim=None, attention_fp32: bool = False) -> UNetConfig:
    """UNetConfig from shapes; the head layout (num_heads, or head_dim) and attention precision are the family's.
    Linear proj_in (2-D weight) and per-level transformer depths are read from the shapes."""
    get = _getter(shapes, prefix, path, "UNet")
    conv_in = get("input_blocks.0.0.weight")
    base = conv_in[0]
    levels = _unet_levels(shapes, prefix)
    if not levels:
        raise CheckpointError(path, f"cannot infer the UNet config: no {prefix}input_blocks.N.0.in_layers keys")
    mult = tuple(get(f"input_blocks.{blocks[0]}.0.out_layers.3.weight")[0] // base for blocks in levels)
    attention = tuple(i for i, blocks in enumerate(levels)
                      if _has(shapes, prefix, f"input_blocks.{blocks[0]}.1.proj_in.weight"))
    depths = tuple(count(shapes, f"{prefix}input_blocks.{blocks[0]}.1.transformer_blocks.") for blocks in levels)
    middle = count(shapes, f"{prefix}middle_block.1.transformer_blocks.")
    used = {depths[i] for i in attention}
    uniform = len(used) <= 1 and middle in (used or {middle})
    channels = [base * m for m in mult]
    proj_in = get("middle_block.1.proj_in.weight")
    return UNetConfig(
        in_channels=conv_in[1], out_channels=get("out.2.weight")[0], model_channels=base, channel_mult=mult,
        num_res_blocks=len(levels[0]), attention_levels=attention,
        num_heads=_divisor(num_heads, channels) if head_dim is None else UNetConfig.num_heads,
        head_dim=None if head_dim is None else _divisor(head_dim, channels),
        transformer_depth=middle if uniform else depths, context_dim=get(
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        norm_groups=_divisor(32, channels), use_linear_proj=len(proj_in) == 2,
        attention_fp32=attention_fp32, transformer_depth_middle=None if uniform else middle)


def _unet_levels(shapes: Mapping, prefix: str) -> list:
    """Input-block indices of the residual blocks, grouped by resolution level (a downsampler `op` ends one)."""
    levels, current, i = [], [], 1
    while True:
        if _has(shapes, prefix, f"input_blocks.{i}.0.in_layers.0.weight"):
            current.append(i)
        elif _has(shapes, prefix, f"input_blocks.{i}.0.op.weight"):
            levels.append(current)
            current = []
        else:
            break
        i += 1
    return levels + [current] if current else levels


def infer_clip_config(shapes: Mapping, prefix: str = CLIP, path="<state dict>") -> CLIPTextConfig:
    get = _getter(shapes, prefix, path, "CLIP")
    vocab, width = get("embeddings.token_embedding.weight")
    layers = count(shapes, prefix + "encoder.layers.")
    return CLIPTextConfig(
        vocab_size=vocab, max_positions=get("embeddings.position_embedding.weight")[0], width=width,
        layers=layers, heads=width // 64 if width % 64 == 0 else 1,
        mlp_width=get("encoder.layers.0.mlp.fc1.weight")[0],
        bos_token_id=vocab - 2, eos_token_id=vocab - 1)  # 49406 / 49407 for the real vocab


def infer_open_clip_config(shapes: Mapping, prefix: str = OPEN_CLIP, path="<state dict>") -> OpenCLIPTextConfig:
    get = _getter(shapes, prefix, path, "OpenCLIP text encoder")
    vocab, width = get("token_embedding.weight")
    return OpenCLIPTextConfig(
        vocab_size=vocab, max_positions=get("positional_embedding")[0], width=width,
        layers=count(shapes, prefix + "transformer.resblocks."), heads=width // 64 if width % 64 == 0 else 1,
        mlp_width=get("transformer.resblocks.0.mlp.c_fc.weight")[0], projection_dim=get("text_projection")[1],
        bos_token_id=vocab - 2, eos_token_id=vocab - 1)


def infer_vae_config(shapes: Mapping, prefix: str = "", path="<state dict>") -> VAEConfig:
    get = _getter(shapes, prefix, path, "VAE")
    conv_in = get("encoder.conv_in.weight")
    base = conv_in[0]
    n_levels = count(shapes, prefix + "encoder.down.")
    mult = tuple(get(f"encoder.down.{i}.block.0.conv1.weight")[0] // base for i in range(n_levels))
    return VAEConfig(
        image_channels=conv_in[1], latent_channels=get("post_quant_conv.weight")[0], base_channels=base,
        channel_mult=mult, num_res_blocks=count(shapes, prefix + "encoder.down.0.block."),
        norm_groups=_divisor(32, [base * m for m in mult]))


def _getter(shapes: Mapping, prefix: str, path, part: str):
    def get(name: str) -> tuple:
        if prefix + name not in shapes:
            raise CheckpointError(path, f"cannot infer the {part} config: key {prefix + name} is missing",
                                  [prefix + name])
        return file_shape(prefix + name, _shape(shapes[prefix + name]))
    return get


def _has(shapes: Mapping, prefix: str, name: str) -> bool:
    return prefix + name in shapes


def count(shapes: Mapping, prefix: str) -> int:
    """Number of numbered children under prefix (`encoder.layers.` -> 12)."""
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})


def _divisor(preferred: int, channels: list) -> int:
    """`preferred` (the family's value) when it divides every channel count, else the largest that does."""
    return math.gcd(preferred, *channels)


def few(keys: list) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")

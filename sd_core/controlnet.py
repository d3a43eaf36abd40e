"""ControlNet for SD 1.x / 2.x: a trainable copy of the UNet's encoder half that reads a control image.

Attribute names follow the LDM ControlNet checkpoint (`control_model.` prefix in the file):
    time_embed.*, input_blocks.*, middle_block.*   the UNet's encoder half (the same blocks as sd_core/unet.py)
    input_hint_block.{0,2,..}                      3x3 convs with SiLU between: control image -> latent size
    zero_convs.N.0                                 1x1 conv per input-block output -> 12 skip residuals
    middle_block_out.0                             1x1 conv on the middle block -> the middle residual
so an LDM file loads structurally (strip `control_model.`). diffusers `ControlNetModel` files load through the
short list of declared renaming rules in `_DIFFUSERS_RULES` (block names, not keys).

How a ControlNet is applied (ComfyUI's ControlNetApplyAdvanced, see `ControlApplication`): at every step whose
sigma lies inside [start_percent, end_percent], it sees the UNet's scaled input x * c_in, timestep and text
context plus the control image resized to 8x the latent (nearest-exact, centre crop); its 13 outputs, times
strength, are added to the UNet's skip connections and middle block. Chained ControlNets add up.
"""
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention_maps
from . import checkpoint as ckpt
from .samplers import sigma_value
from .unet import ConvIn, Downsample, ResBlock, SpatialTransformer, UNetBlock, UNetConfig, timestep_embedding

PREFIX = "control_model."
CONFIG_METADATA_KEY = "glass_diffusion.controlnet_config"


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig = UNetConfig()  # the encoder half's config (out_channels unused)
    hint_channels: int = 3  # RGB control image
    hint_widths: tuple = (16, 32, 96, 256)  # hint block widths; one stride-2 conv between consecutive widths

    @property
    def downscale(self) -> int:
        """Control-image pixels per latent cell (8 for SD 1.x)."""
        return 2 ** (len(self.hint_widths) - 1)

    @classmethod
    def for_unet(cls, unet: UNetConfig, **kw) -> "ControlNetConfig":
        return cls(unet=unet, **kw)

    def to_dict(self) -> dict:
        return {"unet": asdict(self.unet), "hint_channels": self.hint_channels, "hint_widths": list(self.hint_widths)}

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        known = {f.name for f in fields(UNetConfig)}
        u = d.get("unet", {})
        if set(u) - known or set(d) - {"unet", "hint_channels", "hint_widths"}:
            raise ValueError(f"unknown fields: {sorted((set(u) - known) | (set(d) - {'unet', 'hint_channels', 'hint_widths'}))}")
        unet = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in u.items()})
        return cls(unet, int(d.get("hint_channels", 3)), tuple(d.get("hint_widths", (16, 32, 96, 256))))


class ControlResiduals(NamedTuple):
    """What a ControlNet adds to a UNet: one residual per input block (skip connection) and one for the middle."""
    skips: tuple  # len(input_blocks) tensors [B, C_i, h_i, w_i]
    middle: torch.Tensor  # [B, C_mid, h_mid, w_mid]

    def __add__(self, other):  # chained ControlNets add up (earlier first, as ComfyUI sums prev + current)
        return ControlResiduals(tuple(a + b for a, b in zip(self.skips, other.skips)), self.middle + other.middle)

    def scaled(self, s: float) -> "ControlResiduals":
        return ControlResiduals(tuple(r * s for r in self.skips), self.middle * s)


def _zero_conv(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 1))


def _transformer(cfg: UNetConfig, channels: int, level=None) -> SpatialTransformer:
    """The UNet's spatial transformer at an input level (None: the middle block), with that level's depth where
    the UNet config has per-level depths."""
    if hasattr(cfg, "depth"):
        return SpatialTransformer(cfg, channels, cfg.middle_depth() if level is None else cfg.depth(level))
    return SpatialTransformer(cfg, channels)


class ControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        chans = [mc * m for m in cfg.channel_mult]
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # control image -> model_channels at the latent size: conv, then (conv, stride-2 conv) per width step
        w = config.hint_widths
        hint = [nn.Conv2d(config.hint_channels, w[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(w[:-1], w[1:]):
            hint += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
        hint.append(nn.Conv2d(w[-1], mc, 3, padding=1))
        self.input_hint_block = nn.Sequential(*hint)

        # the UNet's encoder half (same blocks and order as UNetModel), a zero conv after every input block
        self.input_blocks = nn.ModuleList([UNetBlock(ConvIn(cfg.in_channels, mc, 3, padding=1))])
        self.zero_convs = nn.ModuleList([_zero_conv(mc)])
        ch = mc
        for level, c in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(cfg, ch, c, emb_dim)]
                ch = c
                if level in cfg.attention_levels:
                    layers.append(_transformer(cfg, ch, level))
                self.input_blocks.append(UNetBlock(*layers))
                self.zero_convs.append(_zero_conv(ch))
            if level < len(chans) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                self.zero_convs.append(_zero_conv(ch))
        self.middle_block = UNetBlock(ResBlock(cfg, ch, ch, emb_dim), _transformer(cfg, ch),
                                      ResBlock(cfg, ch, ch, emb_dim))
        self.middle_block_out = _zero_conv(ch)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embed[0].weight.device

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor) -> ControlResiduals:
        """x [B, Cin, h, w] (the UNet's scaled input), hint [B|1, 3, h*d, w*d] in 0..1 (d = config.downscale),
        timesteps [B] or [1], context [B, T, context_dim] -> ControlResiduals (unscaled by strength)."""
        dtype = self.dtype
        B = x.shape[0]
        t = timesteps.to(x.device).reshape(-1).expand(B)
        emb = self.time_embed(timestep_embedding(t, self.config.unet.model_channels).to(dtype))  # (B, 4 mc)
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype))  # (B|1, 3, h*d, w*d) -> (B|1, mc, h, w)

        h, skips = x.to(dtype), []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided  # the control image enters after the first conv
            skips.append(zero_conv(h))  # (B, C_i, h_i, w_i)
        h = self.middle_block(h, emb, context)
        return ControlResiduals(tuple(skips), self.middle_block_out(h))

    @classmethod
    def from_unet(cls, unet, hint_widths=(16, 32, 96, 256), hint_channels=3) -> "ControlNet":
        """A new ControlNet for `unet` (a UNetModel): encoder weights copied, zero convs and the last hint conv
        zero (so it starts by adding nothing), other hint convs default-initialised (the ControlNet recipe)."""
        net = cls(ControlNetConfig(unet.config, hint_channels, tuple(hint_widths)))
        own = net.state_dict()
        net.load_state_dict({**own, **{k: v for k, v in unet.state_dict().items() if k in own}}, strict=True)
        with torch.no_grad():
            for conv in [*(z[0] for z in net.zero_convs), net.middle_block_out[0], net.input_hint_block[-1]]:
                conv.weight.zero_()
                conv.bias.zero_()
        return net.to(next(unet.parameters()).dtype)


# ---------------------------------------------------------------------------------------------- files

# diffusers ControlNetModel -> LDM names: block-level renaming rules (n = layers per block, hint = number of
# cond-embedding blocks); the names inside a transformer are the same in both layouts.
_RESNET_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_DIFFUSERS_RULES = (
    (r"conv_in\.", lambda m, n, hint: "input_blocks.0.0."),
    (r"time_embedding\.linear_([12])\.", lambda m, n, hint: f"time_embed.{2 * int(m[1]) - 2}."),
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
     lambda m, n, hint: f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.0.{_RESNET_RENAMES[m[3]]}."),
    (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m, n, hint: f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.1."),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m, n, hint: f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op."),
    (r"mid_block\.resnets\.(\d+)\.(\w+)\.", lambda m, n, hint: f"middle_block.{2 * int(m[1])}.{_RESNET_RENAMES[m[2]]}."),
    (r"mid_block\.attentions\.0\.", lambda m, n, hint: "middle_block.1."),
    (r"controlnet_cond_embedding\.conv_in\.", lambda m, n, hint: "input_hint_block.0."),
    (r"controlnet_cond_embedding\.blocks\.(\d+)\.", lambda m, n, hint: f"input_hint_block.{2 * int(m[1]) + 2}."),
    (r"controlnet_cond_embedding\.conv_out\.", lambda m, n, hint: f"input_hint_block.{2 * hint + 2}."),
    (r"controlnet_down_blocks\.(\d+)\.", lambda m, n, hint: f"zero_convs.{m[1]}.0."),
    (r"controlnet_mid_block\.", lambda m, n, hint: "middle_block_out.0."),
)
_DIFFUSERS_RULES = tuple((re.compile(p), f) for p, f in _DIFFUSERS_RULES)

# other kinds of control files, refused by name: (what it is, a key pattern that shows it)
_OTHER_KINDS = (
    ("a Control-LoRA (SDXL)", re.compile(r"(^|\.)lora_controlnet$")),
    ("an SDXL ControlNet", re.compile(r"(^|\.)(label_emb|add_embedding)\.")),
    ("a ControlNet Union (SDXL)", re.compile(r"(^|\.)(task_embedding|control_add_embedding|transformer_layes)")),
    ("a ControlNet-XS", re.compile(r"(^|\.)(ctrl_to_base|base_to_ctrl|control_to_base_for_)")),
    ("a transformer (SD3 / Flux / HunyuanDiT) ControlNet", re.compile(r"(^|\.)(controlnet_blocks|pos_embed|"
                                                                     r"transformer_blocks\.\d+\.attn\.|x_embedder)")),
    ("a T2I-Adapter", re.compile(r"^(adapter\.)?body\.\d+\.")),
    ("a full SD checkpoint, not a ControlNet", re.compile(r"^model\.diffusion_model\.")),
)


def _layout(path, names: list) -> str:
    """'ldm' (with or without the control_model. prefix) or 'diffusers'; other kinds refused by name."""
    for what, pattern in _OTHER_KINDS:
        hit = next((k for k in names if pattern.search(k)), None)
        if hit is not None:
            raise ckpt.CheckpointError(path, f"looks like {what} (found {hit}); the ControlNet loader takes "
                                             "SD 1.x / 2.x ControlNets only", [hit])
    if any(k.startswith(PREFIX + "input_hint_block.") for k in names) or "input_hint_block.0.weight" in names:
        return "ldm"
    if "controlnet_cond_embedding.conv_in.weight" in names:
        return "diffusers"
    raise ckpt.CheckpointError(path, "not a ControlNet: no control_model.input_hint_block.* (LDM layout) or "
                                     f"controlnet_cond_embedding.* (diffusers layout); first keys: "
                                     f"{', '.join(sorted(names)[:5])}")


def _model_entries(path, raw: dict) -> dict:
    """File entries under the model's names (the declared transforms: strip control_model., or rename the
    diffusers layout's blocks)."""
    names = list(raw)
    if _layout(path, names) == "ldm":
        if any(k.startswith(PREFIX) for k in names):
            return {k[len(PREFIX):]: e for k, e in raw.items() if k.startswith(PREFIX)}
        return dict(raw)
    n = _count(raw, "down_blocks.0.resnets.")
    hint = _count(raw, "controlnet_cond_embedding.blocks.")
    out = {}
    for name, entry in raw.items():
        for pattern, rename in _DIFFUSERS_RULES:
            m = pattern.match(name)
            if m:
                try:
                    name = rename(m, n, hint) + name[m.end():]
                except KeyError:
                    raise ckpt.CheckpointError(path, f"unexpected diffusers ControlNet key {name}", [name]) from None
                break
        out[name] = entry  # names no rule matched are reported as unexpected by the strict load
    return out


def _count(names, prefix: str) -> int:
    """Number of numbered children under prefix (`down_blocks.0.resnets.` -> 2)."""
    return len({k[len(prefix):].split(".")[0] for k in names if k.startswith(prefix)})


def _levels(shapes) -> list:
    """Input-block indices of the residual blocks, grouped by resolution level (a downsampler `op` ends one)."""
    levels, current, i = [], [], 1
    while True:
        if f"input_blocks.{i}.0.in_layers.0.weight" in shapes:
            current.append(i)
        elif f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append(current)
            current = []
        else:
            break
        i += 1
    return levels + [current] if current else levels


def infer_controlnet_config(shapes: dict, path="<state dict>") -> ControlNetConfig:
    """ControlNetConfig from {name: shape} under the model's names. Head counts are not in the shapes: SD 1.x's
    8 heads (SD 2.x: 64-channel heads where the UNet config supports it)."""
    def get(name: str) -> tuple:
        if name not in shapes:
            raise ckpt.CheckpointError(path, f"cannot infer the ControlNet config: key {name} is missing", [name])
        return tuple(shapes[name])

    conv_in = get("input_blocks.0.0.weight")
    base = conv_in[0]
    levels = _levels(shapes)
    if not levels:
        raise ckpt.CheckpointError(path, "cannot infer the ControlNet config: no input_blocks.N.0.in_layers keys")
    mult = tuple(get(f"input_blocks.{b[0]}.0.out_layers.3.weight")[0] // base for b in levels)
    attention = tuple(i for i, b in enumerate(levels) if f"input_blocks.{b[0]}.1.proj_in.weight" in shapes)
    depth = _count(shapes, "middle_block.1.transformer_blocks.")
    channels = [base * m for m in mult]
    proj = get("middle_block.1.proj_in.weight")
    unet = dict(in_channels=conv_in[1], out_channels=conv_in[1], model_channels=base, channel_mult=mult,
                num_res_blocks=len(levels[0]), attention_levels=attention, num_heads=math.gcd(8, *channels),
                transformer_depth=depth, context_dim=get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
                norm_groups=math.gcd(32, *channels))
    if len(proj) == 2:  # SD 2.x: linear proj_in, 64-channel heads
        have = {f.name for f in fields(UNetConfig)}
        if "use_linear_proj" not in have:
            raise ckpt.CheckpointError(path, "looks like an SD 2.x ControlNet (linear middle_block.1.proj_in); "
                                             "this build's UNet supports SD 1.x only")
        unet["use_linear_proj"] = True
        if "head_dim" in have:
            unet["head_dim"] = 64
    hint_convs = sorted(int(k.split(".")[1]) for k in shapes
                        if k.startswith("input_hint_block.") and k.endswith(".weight"))
    outs = [get(f"input_hint_block.{i}.weight")[0] for i in hint_convs]
    return ControlNetConfig(UNetConfig(**unet), hint_channels=get("input_hint_block.0.weight")[1],
                            hint_widths=tuple(outs[:-1][0::2]))


def _metadata_config(path, metadata):
    text = (metadata or {}).get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        return ControlNetConfig.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError) as e:
        raise ckpt.CheckpointError(path, f"metadata {CONFIG_METADATA_KEY} is not a valid ControlNet config: {e}") \
            from None


def load_controlnet(path, device="cpu", dtype=None, config=None) -> ControlNet:
    """Load a ControlNet file: LDM layout (`control_model.*`, `.safetensors` or a weights-only `.pth`) or a
    diffusers ControlNetModel file. dtype None keeps the file's float dtype. config: the ControlNetConfig when
    neither the file's metadata nor the SD head counts give it. Errors name the file."""
    path = Path(path)
    with ckpt._open_tensors(path) as (raw, metadata):
        entries = _model_entries(path, raw)
        config = config or _metadata_config(path, metadata) or infer_controlnet_config(
            {k: e.shape for k, e in entries.items()}, path)
        with torch.device("meta"):  # no memory, no random init
            model = ControlNet(config)
        ckpt._load_into(path, model, entries, device, dtype)
    return model.eval()


def save_controlnet(model: ControlNet, path, dtype=torch.float16, overwrite=False, metadata=None) -> Path:
    """Write `model` in the LDM layout (`control_model.*`) as .safetensors with its config in the metadata.
    Atomic: a temp file in the same folder, then os.replace."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: save_controlnet writes .safetensors files only")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    tensors = {PREFIX + k: ckpt._for_saving(k, t, dtype) for k, t in model.state_dict().items()}
    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    ckpt._atomic_save_file(tensors, path, {**extra, "format": "pt",
                                           CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())})
    return path


# ---------------------------------------------------------------------------------------------- applying

def resize_hint(hint: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, height, width]: centre crop to the target aspect, then nearest-exact (ComfyUI's
    rule for control images)."""
    H, W = hint.shape[-2:]
    if (H, W) == (height, width):
        return hint
    old, new = W / H, width / height
    x = round((W - W * (new / old)) / 2) if old > new else 0
    y = round((H - H * (old / new)) / 2) if old < new else 0
    hint = hint[..., y:H - y, x:W - x]  # (B, C, H - 2y, W - 2x)
    return F.interpolate(hint, size=(height, width), mode="nearest-exact")


@dataclass(frozen=True, eq=False)
class ControlApplication:
    """One ControlNet applied to a conditioning (what rides on a CONDITIONING entry under CONTROL_KEY).
    `previous` chains earlier applications; their residuals add up. Compared by identity: entries that share
    one application (positive and negative of one apply node) run in one batch."""
    net: ControlNet
    image: torch.Tensor  # [Bi, 3, H, W] float32 0..1 on the CPU
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: Optional["ControlApplication"] = None

    def chain(self) -> list:
        """Earliest first."""
        out, link = [], self
        while link is not None:
            out.append(link)
            link = link.previous
        return out[::-1]


CONTROL_KEY = "glass_control"  # our key on CONDITIONING dicts (ComfyUI's own "control" holds its objects)


def check_image(image, name="image") -> torch.Tensor:
    """A control IMAGE [B, H, W, 3] (0..1, finite) -> [B, 3, H, W] float32 on the CPU."""
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be an IMAGE [B, H, W, 3], got "
                         f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return image.detach().to("cpu", torch.float32).movedim(-1, 1).contiguous()


def check_conditioning_width(cond, width: int, name="conditioning") -> None:
    """A CONDITIONING list of [tensor [B, T, width], dict] pairs with finite values (what a ControlNet of this
    text width can be applied to)."""
    if not isinstance(cond, (list, tuple)) or len(cond) == 0:
        raise ValueError(f"{name} must be a non-empty CONDITIONING list of [tensor, dict] pairs")
    for i, entry in enumerate(cond):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0])
                and isinstance(entry[1], dict)):
            raise ValueError(f"{name}[{i}] must be a [tensor, dict] pair")
        if entry[0].ndim != 3 or entry[0].shape[-1] != width:
            raise ValueError(f"{name}[{i}] has shape {tuple(entry[0].shape)}, not [B, tokens, {width}]")
        if not torch.isfinite(entry[0]).all():
            raise ValueError(f"{name}[{i}] contains NaN or infinite values")


def apply_control(cond: list, net: ControlNet, image: torch.Tensor, strength: float, start_percent: float,
                  end_percent: float, shared: Optional[dict] = None) -> list:
    """A new CONDITIONING whose entries carry `net` applied with `image` ([B, 3, H, W] from check_image) on top
    of whatever control they had. `shared` (a dict) lets positive and negative share one application per
    previous chain, so they batch together."""
    shared = {} if shared is None else shared
    out = []
    for context, opts in cond:
        prev = opts.get(CONTROL_KEY)
        if id(prev) not in shared:
            shared[id(prev)] = ControlApplication(net, image, float(strength), float(start_percent),
                                                  float(end_percent), prev)
        out.append([context, {**opts, CONTROL_KEY: shared[id(prev)]}])
    return out


class ControlRunner:
    """Computes the summed residuals of one ControlApplication chain at a step, for a batch of n conds x B.

    The sigma ranges come from model_sampling.percent_to_sigma; resized control images are cached per size."""

    def __init__(self, app: ControlApplication, model_sampling, batch: int, context_dim=None):
        self.links = app.chain()
        self.ranges = [(model_sampling.percent_to_sigma(a.start_percent), model_sampling.percent_to_sigma(a.end_percent))
                       for a in self.links]
        for a in self.links:
            if a.image.shape[0] not in (1, batch):
                raise ValueError(f"ControlNet control image has batch {a.image.shape[0]} but the latent batch is "
                                 f"{batch}: give one image, or one per latent")
            if context_dim is not None and a.net.config.unet.context_dim != context_dim:
                raise ValueError(f"ControlNet expects text width {a.net.config.unet.context_dim} but the model's is "
                                 f"{context_dim}: a ControlNet for another model family")
        self._hints = {}

    def _hint(self, i: int, h: int, w: int, n: int, b: int) -> torch.Tensor:
        link = self.links[i]
        d = link.net.config.downscale
        key = (i, h, w)
        if key not in self._hints:
            self._hints[key] = resize_hint(link.image, h * d, w * d).to(link.net.device, link.net.dtype)
        hint = self._hints[key]
        return hint if hint.shape[0] == 1 else hint[:b].repeat(n, 1, 1, 1)  # (n * b, 3, h d, w d)

    def __call__(self, x_scaled, sigma, t, context, n: int) -> Optional[ControlResiduals]:
        """x_scaled [n*b, C, h, w] (c_in applied), sigma (a float, or the denoiser's sigma batch), t [n*b],
        context [n*b, T, D] -> summed residuals or None when no link is active at this sigma. The sigma's value is
        read only for links whose step range can exclude a step (not 0% .. 100%): a host sync on a GPU unless
        the sampler passed the value along (samplers.sigma_value)."""
        total = None
        b = x_scaled.shape[0] // n
        for i, (link, (s_start, s_end)) in enumerate(zip(self.links, self.ranges)):
            if link.start_percent > 0.0 or link.end_percent < 1.0:
                if torch.is_tensor(sigma):
                    sigma = sigma_value(sigma)
                if sigma > s_start or sigma < s_end:
                    continue
            dev = link.net.device
            with attention_maps.paused():  # attention maps are the UNet's, not the ControlNet's
                r = link.net(x_scaled.to(dev), self._hint(i, *x_scaled.shape[-2:], n, b), t.to(dev),
                             context.to(dev)).scaled(link.strength)
            total = r if total is None else total + r
        if total is None:
            return None
        to = x_scaled.device
        return ControlResiduals(tuple(s.to(to) for s in total.skips), total.middle.to(to))

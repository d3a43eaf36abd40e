"""LoRA and LyCORIS files as weight patches, applied as ComfyUI applies them, without touching the model.

A file is a flat dict of tensors named `<module name><suffix>`. Module names come in several spellings,
all derived here from the modules themselves (never a per-key table):
    kohya         `lora_unet_<path with _>`, `lora_te_<path with _>` (also `lora_te1_`, `lycoris_`), the
                  UNet path in LDM spelling (`input_blocks_1_1_...`, our attribute names) or in diffusers
                  spelling (`down_blocks_0_attentions_0_...`, see `diffusers_unet_names`);
    diffusers     `unet.<diffusers path>` / `text_encoder.<HF path>`, PEFT's `base_model.model.<path>`, the
                  older attention-processor `unet.<...>.processor.to_q` (+ `_lora.up.weight`);
    generic       `diffusion_model.<LDM path>`, `text_encoders.<HF path>`, ComfyUI's plain names
                  `text_encoders.clip_l.transformer.<HF path>` (`clip_h` for OpenCLIP).
Text-encoder keys use Hugging Face CLIPTextModel paths (`text_model.encoder.layers.N.self_attn.q_proj`, what kohya
and diffusers train on, for SD 2.x too). Our CLIP ViT-L has those names; for SD 2.x's OpenCLIP they are read off
its module tree by a rule per module kind (`hf_clip_slots`), and q / k / v land on the row blocks [0:W], [W:2W],
[2W:3W] of the packed `attn.in_proj_weight` / `in_proj_bias`: each patch treats its block as the weight (the
reshape, DoRA's norm), as ComfyUI does with the separate q, k, v weights it converts SD 2.x's encoder into.
A file whose shapes do not fit because it was made for another family (SD 1.x's 768-wide CLIP ViT-L and
cross-attention context on SD 2.x's 1024-wide OpenCLIP, or the other way round) is refused saying so.
Suffixes name the adapter kind:
    LoRA / LoCon  `.lora_up.weight` [out, r(, 1, 1)], `.lora_down.weight` [r, in(, kh, kw)], optional
                  `.lora_mid.weight` [r, r, kh, kw] (Tucker); PEFT `.lora_B.weight` / `.lora_A.weight`;
                  `_lora.up/down.weight`, `.lora.up/down.weight`, `.lora_linear_layer.up/down.weight`
    LoHa          `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (+ Tucker `.hada_t1`, `.hada_t2`)
    LoKr          `.lokr_w1` or `.lokr_w1_a` + `.lokr_w1_b`; `.lokr_w2` or `.lokr_w2_a` + `.lokr_w2_b` (+ `.lokr_t2`)
    full          `.diff` (weight), `.diff_b` (bias), `.w_norm` / `.b_norm` (norm layers)
    common        `.alpha` (scalar), `.dora_scale` (DoRA magnitude)

The numbers (ComfyUI's rules): a weight is copied to fp32, every patch is added in order, then it is cast
back to the weight's dtype. LoRA: W += strength * scale * up @ down with scale = alpha / rank, or 1 when the
file has no alpha; alpha 0 therefore scales by 0 (kohya and LyCORIS read alpha 0 as alpha = rank; we follow
ComfyUI). LoHa: scale alpha / rank. LoKr: alpha / rank when a factor is decomposed, else 1. DoRA
(`dora_scale`): W' = dora_scale * (W + scale * delta) / ||W + scale * delta|| with the norm taken along the
axis dora_scale spans, as the DoRA method and LyCORIS define it (ComfyUI divides output-axis DoRA by the norm
of the *original* weight instead; see README), and strength s blends W + s * (W' - W), so strength 0 is W.

Patches never mutate the loaded model: `patched_module(module, patches)` returns a copy-on-write view that
shares every tensor except the patched ones, so a cached model handed to several nodes stays as loaded.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, _open_tensors

log = logging.getLogger(__name__)

# (up, down) suffix pairs of low-rank LoRA, first match wins (ComfyUI's order)
LORA_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
LORA_MID = ".lora_mid.weight"
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL_KEYS = ("diff", "diff_b", "w_norm", "b_norm")
COMMON_KEYS = ("alpha", "dora_scale")
_DOT_SUFFIXES = tuple("." + k for k in LOHA_KEYS + LOKR_KEYS + FULL_KEYS + COMMON_KEYS) + (LORA_MID,)
SUFFIXES = tuple(sorted({s for pair in LORA_SUFFIXES for s in pair} | set(_DOT_SUFFIXES), key=len, reverse=True))


class LoraError(ValueError):
    """A LoRA file that cannot be applied. The message names the file (and the keys, `.keys`)."""

    def __init__(self, path, message: str, keys: Iterable[str] = ()):
        self.path, self.keys = str(path), list(keys)
        super().__init__(f"{path}: {message}")


def _few(names, n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


# ------------------------------------------------------------------------------------------ adapters

def _f32(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class Adapter:
    """One module's patch from one file: `kind` in {lora, loha, lokr, diff} and its tensors (file names
    without the module prefix: 'up', 'down', 'mid', 'hada_w1_a', 'lokr_w1', 'diff', ...). `rows` (start, stop):
    the patch is for that row block of the parameter (q, k or v of a packed in_proj), which is the weight it
    reshapes to and DoRA normalises; None: the whole parameter."""
    kind: str
    tensors: Mapping[str, torch.Tensor]
    alpha: Optional[float] = None
    dora_scale: Optional[torch.Tensor] = None
    rows: Optional[tuple] = None

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        """The unscaled-by-strength weight change, scale included, fp32 on w's device, shaped like w."""
        d, scale = self._raw({k: _f32(v, w) for k, v in self.tensors.items()})
        return d.reshape(w.shape) * scale

    def raw_shape(self) -> tuple:
        """The shape of the change the factors make before it is fitted to a weight ([out, in * kh * kw] for a
        low-rank pair, the full shape for diff and Tucker cores); computed on the meta device, no arithmetic."""
        return tuple(self._raw({k: v.to("meta", torch.float32) for k, v in self.tensors.items()})[0].shape)

    def _raw(self, t: dict) -> tuple:
        """(change before reshaping, scale) from the fp32 factors t."""
        if self.kind == "diff":
            return t["diff"], 1.0
        if self.kind == "lora":
            up, down = t["up"], t["down"]
            rank = down.shape[0]
            if "mid" in t:  # Tucker: fold the core into down, [r, r, kh, kw] x [r, in] -> [r, in, kh, kw]
                down = torch.einsum("i j h w, j c -> i c h w", t["mid"], down.flatten(1))
            return up.flatten(1) @ down.flatten(1), self._scale(rank)  # (out, r) @ (r, in*kh*kw) -> (out, in*kh*kw)
        if self.kind == "loha":
            rank = t["hada_w1_b"].shape[0]
            if "hada_t1" in t:  # Tucker halves: t [r, r, kh, kw], a [r, out], b [r, in] -> [out, in, kh, kw]
                m1 = torch.einsum("i j h w, j c, i o -> o c h w", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                m2 = torch.einsum("i j h w, j c, i o -> o c h w", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            else:  # (out, r) @ (r, in*k) twice, Hadamard product
                m1 = t["hada_w1_a"] @ t["hada_w1_b"]
                m2 = t["hada_w2_a"] @ t["hada_w2_b"]
            return m1 * m2, self._scale(rank)
        if self.kind == "lokr":
            rank = None
            w1 = t.get("lokr_w1")
            if w1 is None:
                rank = t["lokr_w1_b"].shape[0]
                w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]  # (o1, r) @ (r, i1) -> (o1, i1)
            w2 = t.get("lokr_w2")
            if w2 is None:
                rank = t["lokr_w2_b"].shape[0]
                if "lokr_t2" in t:  # t [r, r, kh, kw], a [r, o2], b [r, i2] -> [o2, i2, kh, kw]
                    w2 = torch.einsum("i j h w, j c, i o -> o c h w", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
                else:
                    w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]  # (o2, r) @ (r, i2*k) -> (o2, i2*k)
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]  # (o1, i1) -> (o1, i1, 1, 1): kron keeps w2's kernel
            scale = 1.0 if rank is None or self.alpha is None else self.alpha / rank
            # kron views its inputs: the einsum result must be made contiguous first
            return torch.kron(w1.contiguous(), w2.contiguous()), scale  # (o1*o2, i1*i2(, kh, kw))
        raise AssertionError(self.kind)

    def _scale(self, rank: int) -> float:
        return 1.0 if self.alpha is None else self.alpha / rank

    def apply(self, w: torch.Tensor, strength: float) -> torch.Tensor:
        """w (fp32) patched with strength; a new tensor."""
        d = self.delta(w)
        if self.dora_scale is None:
            return w + strength * d
        merged = w + d
        m = _f32(self.dora_scale, w)
        if m.shape[0] == w.shape[0]:  # [out, 1, ...]: per output row (ComfyUI's test of the axis)
            norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        else:  # [1, in, ...]: per input column
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
        decomposed = merged * (m.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps))
        return w + strength * (decomposed - w)


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """The patches one file makes to one network (UNet or text encoder), at one strength.
    adapters: parameter name in the network ('input_blocks.1.1.proj_in.weight'; a row block of one:
    'transformer.resblocks.0.attn.in_proj_weight[0:1024]') -> Adapter."""
    source: str
    adapters: Mapping[str, Adapter]
    strength: float = 1.0

    def with_strength(self, strength: float) -> "LoraPatch":
        return LoraPatch(self.source, self.adapters, float(strength))


# ------------------------------------------------------------------------------------------ names

_RES_RENAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def diffusers_unet_names(unet: nn.Module) -> dict:
    """Our (LDM) module name -> diffusers' name, for every module of the UNet with a weight, read off the
    module structure: a level ends at each Downsample (Upsample on the way up); within a level the k-th
    ResBlock is `resnets.k`, the k-th SpatialTransformer `attentions.k` (inner names are the same), and
    a ResBlock's layers take diffusers' names (in_layers.2 -> conv1, ...)."""
    from .unet import Downsample, ResBlock, SpatialTransformer, Upsample
    blocks = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "out.0": "conv_norm_out", "out.2": "conv_out"}

    def walk(prefix: str, container, diff_prefix, sampler_cls, sampler_name):
        level, counts = 0, {"resnets": 0, "attentions": 0}
        for i, block in enumerate(container):
            for j, layer in enumerate(block):
                ours = f"{prefix}.{i}.{j}"
                if isinstance(layer, ResBlock | SpatialTransformer):
                    kind = "resnets" if isinstance(layer, ResBlock) else "attentions"
                    blocks[ours] = f"{diff_prefix(level)}.{kind}.{counts[kind]}"
                    counts[kind] += 1
                elif isinstance(layer, sampler_cls):
                    blocks[f"{ours}.{sampler_name[0]}"] = f"{diff_prefix(level)}.{sampler_name[1]}.0.conv"
                elif prefix == "input_blocks" and (i, j) == (0, 0):
                    blocks[ours] = "conv_in"
                    continue
                else:
                    raise AssertionError(f"unexpected {type(layer).__name__} at {ours}")
            if isinstance(block[-1], sampler_cls):
                level, counts = level + 1, {"resnets": 0, "attentions": 0}

    walk("input_blocks", unet.input_blocks, lambda lv: f"down_blocks.{lv}", Downsample, ("op", "downsamplers"))
    walk("output_blocks", unet.output_blocks, lambda lv: f"up_blocks.{lv}", Upsample, ("conv", "upsamplers"))
    for j, layer in enumerate(unet.middle_block):
        kind = "resnets" if isinstance(layer, ResBlock) else "attentions"
        blocks[f"middle_block.{j}"] = f"mid_block.{kind}.{sum(isinstance(x, type(layer)) for x in unet.middle_block[:j])}"

    out = {}
    for name, module in unet.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest block prefix that is a known block
            head, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
            if head in blocks:
                if rest and isinstance(unet.get_submodule(head), ResBlock):
                    rest = _RES_RENAMES[rest]
                out[name] = blocks[head] + ("." + rest if rest else "")
                break
    return out


def _with_weight(module: nn.Module):
    for name, m in module.named_modules():
        if name and isinstance(getattr(m, "weight", None), torch.Tensor):
            yield name, m


@dataclass(frozen=True)
class Slot:
    """Where a module a file names lands: our network ('unet' | 'clip'), our module, and for each parameter the
    file patches ('weight', 'bias') our parameter's name and the row block of it (None: all of it)."""
    net: str
    module: str
    params: tuple = (("weight", "weight", None), ("bias", "bias", None))

    def target(self, param: str):
        """(our parameter name, rows) for the file's `param`, or (None, None)."""
        for theirs, ours, rows in self.params:
            if theirs == param:
                return ours, rows
        return None, None


# OpenCLIP (our LDM names) -> the Hugging Face CLIPTextModel names SD 2.x LoRAs are trained on (kohya and
# diffusers load SD 2.x's text tower as a CLIPTextModel): a path rule per module kind of a resblock; the packed
# attention's in_proj becomes q_proj / k_proj / v_proj, its row blocks [0:W], [W:2W], [2W:3W].
_OPEN_CLIP_TO_HF = ((r"transformer\.resblocks\.(\d+)\.attn", r"encoder.layers.\1.self_attn"),
                    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj", r"encoder.layers.\1.self_attn.out_proj"),
                    (r"transformer\.resblocks\.(\d+)\.ln_1", r"encoder.layers.\1.layer_norm1"),
                    (r"transformer\.resblocks\.(\d+)\.ln_2", r"encoder.layers.\1.layer_norm2"),
                    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc", r"encoder.layers.\1.mlp.fc1"),
                    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj", r"encoder.layers.\1.mlp.fc2"),
                    (r"token_embedding", "embeddings.token_embedding"),
                    (r"ln_final", "final_layer_norm"))


def hf_clip_slots(clip: nn.Module) -> dict:
    """Hugging Face CLIPTextModel module name ('text_model.encoder.layers.0.self_attn.q_proj') -> Slot, for
    every module of our text encoder a LoRA can patch. Our CLIP ViT-L keeps those names; for OpenCLIP they
    are read off the module tree with the rules above."""
    from .open_clip import OpenCLIPTextModel, PackedSelfAttention
    if not isinstance(clip, OpenCLIPTextModel):
        return {name: Slot("clip", name) for name, _ in _with_weight(clip)}
    out = {}
    for name, m in clip.named_modules():
        packed = isinstance(m, PackedSelfAttention)
        if not name or not (packed or isinstance(getattr(m, "weight", None), torch.Tensor)):
            continue
        hf = next((re.sub(f"^{ours}$", theirs, name) for ours, theirs in _OPEN_CLIP_TO_HF
                   if re.fullmatch(ours, name)), None)
        if hf is None:
            raise AssertionError(f"no Hugging Face name for OpenCLIP module {name}")
        if packed:
            width = m.in_proj_weight.shape[0] // 3  # [3W, W]: q, k, v stacked by rows
            for j, proj in enumerate("qkv"):
                rows = (j * width, (j + 1) * width)
                out[f"text_model.{hf}.{proj}_proj"] = Slot(
                    "clip", name, (("weight", "in_proj_weight", rows), ("bias", "in_proj_bias", rows)))
        else:
            out[f"text_model.{hf}"] = Slot("clip", name)
    return out


def lora_names(unet: Optional[nn.Module] = None, clip: Optional[nn.Module] = None) -> dict:
    """Every name a file may give a module -> its Slot."""
    names = {}
    if unet is not None:
        diff = diffusers_unet_names(unet)
        for name, _ in _with_weight(unet):
            spellings = [f"lora_unet_{name.replace('.', '_')}", f"diffusion_model.{name}"]
            d = diff.get(name)
            if d is not None:
                proc = d.replace(".to_", ".processor.to_").removesuffix(".0") if ".attn" in d else d
                spellings += [f"lora_unet_{d.replace('.', '_')}", f"lycoris_{d.replace('.', '_')}", f"unet.{d}",
                              d, f"base_model.model.{d}", f"unet.{proc}", proc]
            for s in spellings:
                names.setdefault(s, Slot("unet", name))
    if clip is not None:
        from .open_clip import OpenCLIPTextModel
        comfy = "clip_h" if isinstance(clip, OpenCLIPTextModel) else "clip_l"  # ComfyUI's name for the encoder
        for hf, slot in hf_clip_slots(clip).items():
            for s in (f"lora_te_{hf.replace('.', '_')}", f"lora_te1_{hf.replace('.', '_')}",
                      f"text_encoder.{hf}", f"text_encoders.{hf}", f"text_encoders.{comfy}.transformer.{hf}"):
                names.setdefault(s, slot)
    return names


def _split(key: str):
    for s in SUFFIXES:
        if key.endswith(s) and len(key) > len(s):
            return key[: -len(s)], s
    return None, None


# ------------------------------------------------------------------------------------------ reading

def read_lora_file(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors file or a weights-only pickle; LoraError naming the file."""
    path = Path(path)
    try:
        with _open_tensors(path) as (entries, metadata):
            tensors = {name: e.read() for name, e in entries.items()}
    except CheckpointError as e:
        raise LoraError(path, str(e).removeprefix(f"{path}: "), e.keys) from None
    if not tensors:
        raise LoraError(path, "holds no tensors")
    return tensors, dict(metadata)


def parse_lora(tensors: Mapping[str, torch.Tensor], unet: Optional[nn.Module] = None,
               clip: Optional[nn.Module] = None, source: str = "LoRA") -> tuple[dict, dict, list]:
    """(unet adapters, clip adapters, unmatched keys) of a LoRA file's tensors for these networks.

    Adapters map our parameter names ('input_blocks.1.1.proj_in.weight') to Adapter. Raises LoraError on
    a tensor whose shape does not fit its module, a non-finite tensor, an incomplete adapter, or a file
    none of whose keys fits the networks (another model family's LoRA)."""
    names = lora_names(unet, clip)
    nets = {"unet": unet, "clip": clip}
    groups, unmatched = {}, []
    for key in tensors:
        prefix, suffix = _split(key)
        if prefix is None or prefix not in names:
            unmatched.append(key)
            continue
        groups.setdefault(prefix, {})[suffix] = key
    if not groups:
        hint = ""
        if any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors) and clip is not None:
            hint = " (lora_te2_ keys: an SDXL LoRA?)"
        raise LoraError(source, f"no key fits this model{hint}; its keys look like: {_few(sorted(tensors), 5)}",
                        sorted(tensors))
    out = {"unet": {}, "clip": {}}
    for prefix, found in groups.items():
        slot = names[prefix]
        module = nets[slot.net].get_submodule(slot.module)
        try:
            adapters = _adapters(source, prefix, found, tensors, module, slot)
        except _ShapeError as e:
            mismatch = _family_mismatch(source, groups, names, nets, tensors)
            if mismatch is None:
                raise
            raise LoraError(source, f"{mismatch}; nothing of it is applied (first misfit: "
                                    f"{str(e).removeprefix(f'{source}: ')})", e.keys) from None
        for param, adapter in adapters.items():
            if target_name(slot, param) in out[slot.net]:
                raise LoraError(source, f"two spellings of the same module in one file: {prefix} and another "
                                        f"name for {slot.net} {slot.module}", [prefix])
            out[slot.net][target_name(slot, param)] = adapter
    return out["unet"], out["clip"], unmatched


def target_name(slot: Slot, param: str) -> str:
    """The LoraPatch.adapters key of the file's `param` of this slot: our parameter, plus '[a:b]' for a row block."""
    ours, rows = slot.target(param)
    return f"{slot.module}.{ours}" + ("" if rows is None else f"[{rows[0]}:{rows[1]}]")


class _ShapeError(LoraError):
    """A patch that does not fit its module's shape (the family check looks at the whole file then)."""


# widths that tell a model family: a text encoder's width, a UNet's cross-attention context width
TEXT_WIDTHS = {768: "SD 1.x's CLIP ViT-L/14", 1024: "SD 2.x's OpenCLIP ViT-H/14", 1280: "SDXL's OpenCLIP ViT-bigG/14"}
CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def _width(w: int, labels: dict) -> str:
    return f"{w} wide" + (f" ({labels[w]})" if w in labels else "")


def _family_mismatch(source, groups, names, nets, tensors) -> Optional[str]:
    """'an SD 1.x LoRA on an SD 2.x model'-style explanation when the input widths of the file's text-encoder
    layers or cross-attention keys / values differ from the model's, else None."""
    from collections import Counter
    seen = {"clip": Counter(), "unet": Counter()}
    model = {}
    for prefix, found in groups.items():
        slot = names[prefix]
        module = nets[slot.net].get_submodule(slot.module)
        ours, rows = slot.target("weight")
        weight = getattr(module, ours or "", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if slot.net == "clip":
            width = nets["clip"].config.width
            if weight.shape[1] != width:  # fc2 takes the MLP width
                continue
        elif slot.module.endswith(("attn2.to_k", "attn2.to_v")):
            width = weight.shape[1]
        else:
            continue
        model[slot.net] = width
        try:
            shape = _build(source, prefix, found, tensors).get("weight").raw_shape()
        except Exception:  # an adapter that cannot be built tells nothing about widths
            continue
        if len(shape) == 2:
            seen[slot.net][shape[1]] += 1
    parts = []
    for net, what, labels in (("clip", "text-encoder layers are", TEXT_WIDTHS),
                              ("unet", "cross-attention takes a context", CONTEXT_WIDTHS)):
        if not seen[net]:
            continue
        theirs, ours = seen[net].most_common(1)[0][0], model[net]
        if theirs != ours:
            target = "text encoder is" if net == "clip" else "UNet's context is"
            parts.append(f"its {what} {_width(theirs, labels)}, this model's {target} {_width(ours, labels)}")
    if not parts:
        return None
    return "a LoRA for another model family: " + "; ".join(parts)


def _adapters(source, prefix: str, found: dict, tensors, module: nn.Module, slot: Slot) -> dict:
    """{'weight' | 'bias': Adapter} for one module's keys (found: suffix -> full key), checked against the
    module's parameters (or their row blocks, slot)."""
    result = _build(source, prefix, found, tensors)
    for param, adapter in list(result.items()):
        ours, rows = slot.target(param)
        target = getattr(module, ours, None) if ours else None
        if not isinstance(target, torch.Tensor):
            raise LoraError(source, f"{prefix}: patches a {param} the module does not have", list(found.values()))
        shape = tuple(target.shape) if rows is None else (rows[1] - rows[0], *target.shape[1:])
        if rows is not None:
            adapter = result[param] = dataclasses.replace(adapter, rows=rows)
        try:
            d = adapter.delta(torch.empty(shape, device="meta"))  # shape checks without arithmetic
        except Exception as e:  # matmul / reshape of factors that do not fit the module
            raise _ShapeError(source, f"{prefix}: tensors {_shapes(adapter)} do not fit the module's {param} "
                                      f"{list(shape)} ({type(e).__name__}: {e})", list(found.values())) from None
        if d.shape != shape:
            raise _ShapeError(source, f"{prefix}: patch shape {list(d.shape)} != {param} {list(shape)}",
                              list(found.values()))
        if adapter.dora_scale is not None and (len(shape) < 2 or adapter.dora_scale.numel() not in shape[:2]):
            raise _ShapeError(source, f"{prefix}: dora_scale {list(adapter.dora_scale.shape)} fits neither axis of "
                                      f"{list(shape)}", list(found.values()))
    return result


def _build(source, prefix: str, found: dict, tensors) -> dict:
    """{'weight' | 'bias': Adapter} for one module's keys, unchecked against the module."""
    def get(suffix):
        key = found.get(suffix)
        if key is None:
            return None
        t = tensors[key]
        if not t.is_floating_point():
            raise LoraError(source, f"{key} is {t.dtype}, not a float tensor", [key])
        if not torch.isfinite(t).all():
            raise LoraError(source, f"{key} has NaN or infinite values", [key])
        return t

    alpha_t, dora = get(".alpha"), get(".dora_scale")
    if alpha_t is not None and alpha_t.numel() != 1:
        raise LoraError(source, f"{found['.alpha']} must be a scalar, has shape {list(alpha_t.shape)}", [found[".alpha"]])
    alpha = None if alpha_t is None else float(alpha_t.reshape(()))
    result = {}

    for up_s, down_s in LORA_SUFFIXES:
        if up_s in found or down_s in found:
            if not (up_s in found and down_s in found):
                raise LoraError(source, f"{prefix}: has {up_s if up_s in found else down_s} without its pair",
                                list(found.values()))
            t = {"up": get(up_s), "down": get(down_s)}
            if LORA_MID in found:
                t["mid"] = get(LORA_MID)
            result["weight"] = Adapter("lora", t, alpha, dora)
            break
    if ".hada_w1_a" in found or ".hada_w1_b" in found:
        t = {k: get("." + k) for k in LOHA_KEYS if "." + k in found}
        _require(source, prefix, t, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if ("hada_t1" in t) != ("hada_t2" in t):
            raise LoraError(source, f"{prefix}: LoHa Tucker needs both hada_t1 and hada_t2", list(found.values()))
        result["weight"] = Adapter("loha", t, alpha, dora)
    if any("." + k in found for k in LOKR_KEYS):
        t = {k: get("." + k) for k in LOKR_KEYS if "." + k in found}
        for side in ("lokr_w1", "lokr_w2"):
            if side not in t and not (f"{side}_a" in t and f"{side}_b" in t):
                raise LoraError(source, f"{prefix}: LoKr needs {side} or both {side}_a and {side}_b",
                                list(found.values()))
        result["weight"] = Adapter("lokr", t, alpha, dora)
    for key, param in ((".diff", "weight"), (".w_norm", "weight"), (".diff_b", "bias"), (".b_norm", "bias")):
        if key in found:
            if param in result:
                raise LoraError(source, f"{prefix}: {key} and another patch for the same {param}", list(found.values()))
            result[param] = Adapter("diff", {"diff": get(key)})
    if not result:
        raise LoraError(source, f"{prefix}: only {', '.join(sorted(found))}, no patch", list(found.values()))
    return result


def _shapes(adapter: Adapter) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in adapter.tensors.items())


def _require(source, prefix, t, keys):
    missing = [k for k in keys if k not in t]
    if missing:
        raise LoraError(source, f"{prefix}: missing {', '.join(missing)}")


def load_lora(path, unet: Optional[nn.Module] = None, clip: Optional[nn.Module] = None,
              strength_unet: float = 1.0, strength_clip: float = 1.0):
    """(unet LoraPatch or None, clip LoraPatch or None) for a file. Keys that fit no module are reported in
    one warning that lists them all. Nothing is applied here: see patched_module."""
    path = Path(path)
    tensors, _ = read_lora_file(path)
    unet_ad, clip_ad, unmatched = parse_lora(tensors, unet, clip, source=str(path))
    if unmatched:
        log.warning("%s: %d LoRA keys fit no module and are not applied: %s", path.name, len(unmatched),
                    ", ".join(unmatched))
    make = lambda ad, s: LoraPatch(path.name, ad, float(s)) if ad else None  # noqa: E731
    return make(unet_ad, strength_unet), make(clip_ad, strength_clip)


# ------------------------------------------------------------------------------------------ applying

def _param_of(key: str) -> str:
    """'...attn.in_proj_weight[0:1024]' -> '...attn.in_proj_weight' (an adapters key's parameter)."""
    return key.partition("[")[0]


@torch.no_grad()
def patched_weights(module: nn.Module, patches: Sequence[LoraPatch]) -> dict:
    """{parameter name: patched tensor} for every parameter a patch with non-zero strength touches: the
    weight copied to fp32, the patches added in order (a row-block patch to its rows), cast back to the
    weight's dtype."""
    params = dict(module.named_parameters())
    live = [p for p in patches if p.strength != 0]
    by_param = [{} for _ in live]  # per patch: parameter -> its adapters (a whole one, or row blocks in file order)
    for index, p in zip(by_param, live):
        for key, adapter in p.adapters.items():
            index.setdefault(_param_of(key), []).append(adapter)
    order = list(dict.fromkeys(name for index in by_param for name in index))
    out = {}
    for name in order:
        w = params[name].detach().to(torch.float32, copy=True)
        for p, index in zip(live, by_param):
            for adapter in index.get(name, ()):
                if adapter.rows is None:
                    w = adapter.apply(w, p.strength)
                else:
                    a, b = adapter.rows
                    w[a:b] = adapter.apply(w[a:b], p.strength)
        out[name] = w.to(params[name].dtype)
    return out


def patched_module(module: nn.Module, patches: Sequence[LoraPatch]) -> nn.Module:
    """A view of `module` with the patches applied: the modules on the path to a patched parameter are
    shallow copies holding the new tensor, everything else (and `module` itself) is shared and unchanged.
    With no patch of non-zero strength this is `module` itself."""
    new = patched_weights(module, patches)
    if not new:
        return module
    copies = {"": _shallow(module)}
    for name, tensor in new.items():
        *path, leaf = name.split(".")
        parent = ""
        for part in path:
            child = f"{parent}.{part}" if parent else part
            if child not in copies:
                copies[child] = _shallow(copies[parent]._modules[part])
                copies[parent]._modules[part] = copies[child]
            parent = child
        copies[parent]._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    return copies[""]


def _shallow(m: nn.Module) -> nn.Module:
    c = copy.copy(m)
    c._modules, c._parameters = dict(m._modules), dict(m._parameters)
    return c


_VIEWS: dict = {}  # id(owner) -> the owner's patched view, dropped with the owner


def view_for(owner, module: nn.Module, patches: Sequence[LoraPatch]) -> nn.Module:
    """patched_module(module, patches), computed once per `owner` (a model handle, which carries the patches)
    and freed with it, so every sampling step and every node using the handle shares one patched view."""
    if not any(p.strength != 0 for p in patches):
        return module
    key = id(owner)
    view = _VIEWS.get(key)
    if view is None:
        view = _VIEWS[key] = patched_module(module, patches)
        weakref.finalize(owner, _VIEWS.pop, key, None)
    return view

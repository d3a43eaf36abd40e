"""Helpers for the LoRA tests: random LoRA / LyCORIS files in the formats people download, and the patched
weights two independent implementations compute from them (diffusers + PEFT, the `lycoris-lora` package).

The files are written from the *reference* models' own module names (diffusers' UNet2DConditionModel,
transformers' CLIPTextModel) or, for LDM spelling, from our module names; the reference implementations
map names themselves. Our patched UNet is compared after diffusers' own LDM -> diffusers conversion.
"""
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from _parity_util import (diffusers_unet, hf_clip, hf_clip_config_for, hf_open_clip, hf_open_clip_config_for,
                          ldm_config_for, ldm_v2_config_for)

from glass_diffusion.sd_core.open_clip import OpenCLIPTextConfig

UNET_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "cond_stage_model.transformer."
OPEN_PREFIX = "te."  # OpenCLIP tensors under a prefix that is not SD 2.x's, so diffusers' converter keeps all layers


def is_sd2(config) -> bool:
    return isinstance(config.clip, OpenCLIPTextConfig)


def _ldm_config(config) -> dict:
    return ldm_v2_config_for(config) if is_sd2(config) else ldm_config_for(config)


def reference_models(model, config):
    """(diffusers UNet, transformers CLIP) holding the same weights as our StableDiffusion `model`. The
    UNet shares our tensors (reference loaders below never write into them); the CLIP is a copy. SD 2.x: the
    OpenCLIP tower as diffusers' single-file converter makes a CLIPTextModel of it (q, k, v split off the packed
    in_proj), every layer kept."""
    ckpt = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    unet = diffusers_unet(ckpt, _ldm_config(config), norm_groups=config.unet.norm_groups)
    if is_sd2(config):
        clip = hf_open_clip({OPEN_PREFIX + k: v for k, v in model.clip.state_dict().items()},
                            hf_open_clip_config_for(config.clip), prefix=OPEN_PREFIX)
    else:
        ckpt.update({CLIP_PREFIX + k: v for k, v in model.clip.state_dict().items()})
        clip = hf_clip(ckpt, hf_clip_config_for(config))
    return unet, clip


def to_diffusers(unet_state: dict, config) -> dict:
    """Our UNet state dict in diffusers' names, through diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    ckpt = {UNET_PREFIX + k: v for k, v in unet_state.items()}
    cfg = create_unet_diffusers_config_from_ldm(_ldm_config(config), ckpt, image_size=512)
    return convert_ldm_unet_checkpoint(ckpt, cfg)


def clip_to_hf(clip_state: dict, config) -> dict:
    """Our text encoder's state dict in Hugging Face CLIPTextModel names (`text_model.` level included): CLIP
    ViT-L has them already; OpenCLIP goes through diffusers' own converter (which splits in_proj into q, k, v)."""
    if not is_sd2(config):
        return dict(clip_state)
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    state = convert_open_clip_checkpoint(None, {OPEN_PREFIX + k: v for k, v in clip_state.items()},
                                         prefix=OPEN_PREFIX)
    return dict(state)


# ------------------------------------------------------------------------------------ kohya / PEFT files
# Modules of an SD 1.5 UNet that diffusers 0.42 cannot place when a kohya file names them in LDM spelling: its
# block remapping (`_maybe_map_sgm_blocks_to_diffusers`) matches `input_blocks_1` inside `input_blocks_10` (and
# `output_blocks_1` inside `output_blocks_10`), and takes `output_blocks_N_1` for an attention block, which the
# lowest level's ResBlock + Upsample blocks are not. Such files are tested with these modules left out.
DIFFUSERS_LDM_BLIND = ("input_blocks.10.", "input_blocks.11.", "output_blocks.1.")


def kohya_targets(module, conv3x3: bool, upsamplers: bool = True, skip=()):
    """(name, weight shape) of the modules a kohya LoRA trains: linear layers and 1x1 convs of the attention
    blocks and CLIP layers; with conv3x3 (LoCon) also the 3x3 convs of res blocks, down- and upsamplers."""
    out = []
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim < 2 or "embed" in name or "time_emb" in name \
                or name.startswith(tuple(skip)):
            continue
        in_attention = any(s in name for s in ("attentions", "transformer_blocks", "proj_in", "proj_out",
                                               "self_attn", "mlp", ".1.proj", ".1.norm"))
        if w.ndim == 2 or (w.ndim == 4 and w.shape[-1] == 1 and in_attention):
            if in_attention:
                out.append((name, tuple(w.shape)))
        elif conv3x3 and w.ndim == 4 and w.shape[-1] == 3 and name not in ("conv_in", "conv_out",
                                                                             "input_blocks.0.0", "out.2") \
                and (upsamplers or not (name.startswith("output_blocks") and name.endswith(".conv"))):
            out.append((name, tuple(w.shape)))
    return out


def random_lowrank(g, shape, rank):
    """(up, down) with kohya's layout: down [r, in(, kh, kw)], up [out, r(, 1, 1)]."""
    out_dim, in_dim, *k = shape
    down = torch.randn(rank, in_dim, *k, generator=g) / math.sqrt(in_dim * max(1, math.prod(k)))
    up = torch.randn(out_dim, rank, *[1] * len(k), generator=g) * 0.1
    return up, down


def kohya_file(path, targets: dict, seed: int, rank: int = 4, alpha=2.0, style: str = "kohya"):
    """Write a random LoRA. targets: {'unet'|'clip': [(name, shape)]}, names already in the file's spelling.
    style 'kohya': lora_unet_<name_>.lora_up/down + .alpha; 'peft': unet.<name>.lora_B/lora_A (no alpha).
    alpha: a number, or a callable(i) -> number or None (None: no alpha key)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for net, items in targets.items():
        for i, (name, shape) in enumerate(items):
            up, down = random_lowrank(g, shape, rank)
            if style == "kohya":
                base = ("lora_unet_" if net == "unet" else "lora_te_") + name.replace(".", "_")
                tensors[base + ".lora_up.weight"], tensors[base + ".lora_down.weight"] = up, down
                a = alpha(i) if callable(alpha) else alpha
                if a is not None:
                    tensors[base + ".alpha"] = torch.tensor(float(a))
            else:
                base = ("unet." if net == "unet" else "text_encoder.") + name
                tensors[base + ".lora_B.weight"], tensors[base + ".lora_A.weight"] = up, down
    save_file(tensors, str(path))
    return tensors


def _apply_state(module, state):
    for name, t in state.items():
        *path, leaf = name.split(".")
        owner = module.get_submodule(".".join(path)) if path else module
        setattr(owner, leaf, torch.nn.Parameter(t, requires_grad=False))


def diffusers_merged(path, unet, clip, strength_unet=1.0, strength_clip=1.0, ldm_names=False):
    """({diffusers UNet name: tensor}, {CLIP name: tensor}) after diffusers loads the file (its kohya
    converter for kohya files) into PEFT layers and fuses them (None for a network passed as None). The models' own tensors are left as they were
    (PEFT's safe merge writes new tensors), the adapters are unloaded afterwards."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    # ldm_names: kohya keys in LDM spelling (input_blocks_1_1_...), which diffusers maps given the UNet config
    state, alphas = Mixin.lora_state_dict(str(path), **({"unet_config": unet.config} if ldm_names else {}))
    out = []
    for model, load, strength in ((unet, lambda: Mixin.load_lora_into_unet(state, alphas, unet, adapter_name="t"),
                                   strength_unet),
                                  (clip, lambda: Mixin.load_lora_into_text_encoder(
                                      state, alphas, clip, prefix="text_encoder", adapter_name="t"), strength_clip)):
        if model is None:  # one network only (its part of the file)
            out.append(None)
            continue
        before = {k: v for k, v in model.state_dict().items()}
        load()
        merged, raw = {}, set()
        for name, m in model.named_modules():
            if isinstance(m, BaseTunerLayer):
                if strength != 1.0:
                    m.scale_layer(strength)
                m.merge(safe_merge=True)
                merged[_text_model(name, model is clip) + ".weight"] = m.get_base_layer().weight.detach().clone()
                raw.add(name + ".weight")
        _unload(model)
        after = model.state_dict()
        # PEFT's safe merge gave the merged layers new tensors; every other tensor is the one it had before
        assert all(after[k].data_ptr() == before[k].data_ptr() for k in before if k not in raw)
        out.append(merged)
    return out[0], out[1]


def _text_model(name: str, is_clip: bool) -> str:
    """CLIP names as files and our CLIP spell them (transformers >= 5 drops the `text_model.` level)."""
    return "text_model." + name if is_clip and not name.startswith("text_model.") else name


def _unload(model):
    from diffusers.utils import recurse_remove_peft_layers
    recurse_remove_peft_layers(model)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            delattr(model, attr)


# ------------------------------------------------------------------------------------ LyCORIS files
def _with_text_model(clip):
    """transformers >= 5 names CLIPTextModel's modules without the `text_model.` level that files (and our
    CLIP) use; LyCORIS names modules by named_modules(), so give it that level back."""
    if hasattr(clip, "text_model"):
        return clip
    holder = torch.nn.Module()
    holder.text_model = clip
    return holder


PRESETS = {  # LyCORIS target presets (UNet module classes, UNet module names, CLIP module classes)
    "classic": ('["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]', '["conv_in", "conv_out"]',
                '["CLIPAttention", "CLIPMLP"]'),  # SD 1.5's usual LyCORIS targets
    "attention": ('["Transformer2DModel"]', '[]', '["CLIPAttention", "CLIPMLP"]'),  # the 192 + 72 of a kohya LoRA
    "convs": ('["Downsample2D", "Upsample2D"]', '["conv_in", "conv_out", "time_embedding.linear_1"]',
              '["CLIPAttention"]'),  # 3x3 convolutions (Tucker cores) and a linear layer, few modules
    "resamplers": ('["Downsample2D", "Upsample2D"]', '[]', '["CLIPAttention"]'),  # 3x3 convs of >= 320 channels
}


def lycoris_file(path, unet, clip, seed: int, algo: str, dim: int = 4, alpha: float = 2.0, targets="classic",
                 **kwargs):
    """Write a random LyCORIS file made by the `lycoris-lora` package itself (its kohya network: names
    lora_unet_<diffusers path>, lora_te_<HF path>), every trained tensor drawn at random."""
    from lycoris.kohya import create_network
    modules, names, te_modules = PRESETS[targets]
    preset = Path(path).with_suffix(".preset.toml")
    preset.write_text(f'enable_conv = true\nunet_target_module = {modules}\nunet_target_name = {names}\n'
                      f'text_encoder_target_module = {te_modules}\ntext_encoder_target_name = []\n')
    torch.manual_seed(seed)
    net = create_network(1.0, dim, alpha, None, _with_text_model(clip), unet, algo=algo, preset=str(preset), **kwargs)
    g = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for module in net.unet_loras + net.text_encoder_loras:
            for name, p in module.named_parameters():
                if name.endswith("dora_scale"):
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
                elif p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p[0].numel(), 1)))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            state.update({f"{module.lora_name}.{k}": v.detach().float().contiguous()
                          for k, v in module.state_dict().items()})
    save_file(state, str(path))
    return state, net


def lycoris_merged(state: dict, unet, clip, multiplier: float = 1.0, net=None):
    """({diffusers UNet name: tensor}, {CLIP name: tensor}): each module's weight as the package's own
    modules (create_network_from_weights) compute it in their forward: W + multiplier * rebuild, or the DoRA
    decomposition of W + rebuild. (Not get_merged_weight: in lycoris-lora 4.1.3 that path applies the LoHa /
    LoKr scale alpha / rank twice, unlike the forward the file was trained with, kohya and ComfyUI.)"""
    from lycoris.kohya import create_network_from_weights
    from lycoris.modules import LoConModule, LohaModule, LokrModule
    clip = _with_text_model(clip)
    if net is None:  # read the file back with the package's own reader (else: the modules that wrote it)
        net, _ = create_network_from_weights(multiplier, None, None, clip, unet, weights_sd=state)
    out = ({}, {})
    ids = {id(m): ("unet", n) for n, m in unet.named_modules()}
    ids.update({id(m): ("clip", n) for n, m in clip.named_modules()})
    for lora in net.unet_loras + net.text_encoder_loras:
        target = lora.org_module[0]
        which, name = ids[id(target)]
        with torch.no_grad():
            base = target.weight.detach().float()
            if isinstance(lora, LoConModule):
                diff = lora.make_weight().reshape(base.shape) * lora.scale
            elif isinstance(lora, LohaModule | LokrModule):
                diff = lora.get_weight(base.shape).reshape(base.shape) * lora.scalar
            else:  # full / diff modules: the merge path is the forward
                w, b = lora.get_merged_weight(multiplier=multiplier, shape=base.shape)
                out[which == "clip"][_text_model(name, which == "clip") + ".weight"] = w.detach().float()
                if b is not None:
                    out[which == "clip"][_text_model(name, which == "clip") + ".bias"] = b.detach().float()
                continue
            w = lora.apply_weight_decompose(base + diff, multiplier) if lora.wd else base + diff * multiplier
        out[which == "clip"][_text_model(name, which == "clip") + ".weight"] = w.detach().float()
    return out

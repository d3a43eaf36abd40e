"""Helpers for the parity tests: seeded random weights, single-file I/O, and reference models built by the
reference libraries' OWN conversion code (diffusers' single-file converters, transformers' from_pretrained).

Only facts (config values) are written here; no key tables: if our layout drifted from the real checkpoint
layout, the reference conversion would fail or produce different numbers.
"""
import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glass_diffusion.sd_core.model import SDConfig, StableDiffusion
from glass_diffusion.sd_core.random_weights import build_random, random_init_  # noqa: F401 (re-exported)

LOCK_FILE = "/tmp/glass_fullsize.lock"
LOCK_HELD_ENV = "GLASS_FULLSIZE_LOCK_HELD"  # set when the caller already runs under `flock LOCK_FILE`


_lock_depth = 0  # re-entrant within this process: a nested user (another fixture) must not deadlock on our fd


@contextmanager
def fullsize_lock():
    """Only one process on this machine builds full-size SD 1.5 networks at a time."""
    global _lock_depth
    if os.environ.get(LOCK_HELD_ENV) or _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    with open(LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _lock_depth = 1
        try:
            yield
        finally:
            _lock_depth = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def save_single_file(model: StableDiffusion, path: Path) -> Path:
    """fp32 single-file checkpoint: the project's save_checkpoint when it is importable, else plain safetensors."""
    try:
        from glass_diffusion.sd_core.checkpoint import save_checkpoint
    except ImportError:
        save_checkpoint = None
    if save_checkpoint is not None:
        return save_checkpoint(model, path, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def read_tensors(path: Path, prefix: str = "") -> dict:
    """Tensors of a .safetensors file whose names start with prefix (names kept whole)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def max_rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


# ------------------------------------------------------------------------ LDM "original_config" dicts
def v1_inference_config(in_channels: int = 4) -> dict:
    """The values of CompVis' configs/stable-diffusion/v1-inference.yaml (v1-inpainting: in_channels 9)."""
    return {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "unet_config": {"params": {
            "image_size": 32, "in_channels": in_channels, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
            "use_checkpoint": True, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
    }}}


def ldm_config_for(config: SDConfig) -> dict:
    """The LDM original_config a model of this (e.g. tiny) size would ship with."""
    u, v = config.unet, config.vae
    d = v1_inference_config(u.in_channels)
    d["model"]["params"]["unet_config"]["params"].update(
        out_channels=u.out_channels, model_channels=u.model_channels, num_res_blocks=u.num_res_blocks,
        channel_mult=list(u.channel_mult), attention_resolutions=[2 ** level for level in u.attention_levels],
        num_heads=u.num_heads, transformer_depth=u.transformer_depth, context_dim=u.context_dim)
    d["model"]["params"]["first_stage_config"]["params"]["ddconfig"].update(
        z_channels=v.latent_channels, ch=v.base_channels, ch_mult=list(v.channel_mult),
        num_res_blocks=v.num_res_blocks)
    return d


# ------------------------------------------------------------------------ reference models
def diffusers_unet(checkpoint: dict, original_config: dict, norm_groups: int = 32):
    """diffusers UNet2DConditionModel from single-file tensors, through diffusers' own LDM converters."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=512)
    config["norm_num_groups"] = norm_groups  # not part of LDM configs (always 32 in real models)
    state = convert_ldm_unet_checkpoint(checkpoint, config)
    return _assign(UNet2DConditionModel, config, state)


def diffusers_vae(checkpoint: dict, original_config: dict, norm_groups: int = 32):
    """diffusers AutoencoderKL from single-file tensors, through diffusers' own LDM converters."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config = create_vae_diffusers_config_from_ldm(original_config, checkpoint, image_size=512)
    config["norm_num_groups"] = norm_groups
    state = convert_ldm_vae_checkpoint(checkpoint, config)
    return _assign(AutoencoderKL, config, state)


def _assign(cls, config: dict, state: dict):
    with torch.device("meta"):  # no second copy of the weights: the model takes the converted tensors
        model = cls(**config)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"reference model tensors not loaded: {left[:5]}"
    return model.float().eval()


SD15_HF_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def hf_clip_config_for(config: SDConfig) -> dict:
    c = config.clip
    return dict(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
                num_hidden_layers=c.layers, num_attention_heads=c.heads, max_position_embeddings=c.max_positions,
                hidden_act="quick_gelu", layer_norm_eps=c.eps, bos_token_id=c.bos_token_id,
                eos_token_id=c.eos_token_id, pad_token_id=1)


def hf_clip(checkpoint: dict, hf_config: dict):
    """transformers CLIPTextModel loaded by from_pretrained from the checkpoint's CLIP tensors with the
    `cond_stage_model.transformer.` prefix stripped (diffusers' convert_ldm_clip_checkpoint), which is HF's
    own file naming."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    state = convert_ldm_clip_checkpoint(checkpoint)
    assert state and all(k.startswith("text_model.") for k in state), sorted(state)[:3]
    with tempfile.TemporaryDirectory() as tmp:
        CLIPTextConfig(**hf_config).save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        model, info = CLIPTextModel.from_pretrained(tmp, local_files_only=True, output_loading_info=True,
                                                    attn_implementation="sdpa", dtype=torch.float32)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


# ------------------------------------------------------------------------ SD 2.x
def v2_inference_config(in_channels: int = 4, v: bool = False) -> dict:
    """The values of Stability-AI/stablediffusion's configs/stable-diffusion/v2-inference.yaml (v2-inference-v:
    parameterization "v"; 512-inpainting-ema: in_channels 9)."""
    d = v1_inference_config(in_channels)
    unet = d["model"]["params"]["unet_config"]["params"]
    del unet["num_heads"]
    unet.update(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
    if v:
        d["model"]["params"]["parameterization"] = "v"
    return d


def ldm_v2_config_for(config: SDConfig, v: bool = False) -> dict:
    """The SD 2.x original_config a model of this (e.g. tiny) size would ship with."""
    u = config.unet
    d = ldm_config_for(config)
    unet = d["model"]["params"]["unet_config"]["params"]
    del unet["num_heads"]
    unet.update(num_head_channels=u.head_dim, use_linear_in_transformer=True)
    if v:
        d["model"]["params"]["parameterization"] = "v"
    return d


def hf_open_clip_config_for(clip, layers: int = None) -> dict:
    """transformers CLIPTextConfig values of an OpenCLIP text tower (SD 2.x: GELU, 1024 wide, 16 heads)."""
    return dict(vocab_size=clip.vocab_size, hidden_size=clip.width, intermediate_size=clip.mlp_width,
                num_hidden_layers=clip.layers if layers is None else layers, num_attention_heads=clip.heads,
                max_position_embeddings=clip.max_positions, hidden_act="gelu", layer_norm_eps=clip.eps,
                projection_dim=clip.projection_dim, bos_token_id=clip.bos_token_id,
                eos_token_id=clip.eos_token_id, pad_token_id=1)


def hf_open_clip(checkpoint: dict, hf_config: dict, prefix: str = "cond_stage_model.model.", projection=False):
    """transformers CLIPTextModel (CLIPTextModelWithProjection with projection=True) loaded by from_pretrained from
    the tensors diffusers' convert_open_clip_checkpoint makes of an SD 2.x checkpoint. With the real prefix the
    converter drops resblock 23 and text_projection (diffusers' SD 2 text encoder has 23 layers); under another
    prefix its ignore list (full key names) does not apply and every layer and the projection are kept."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    state = convert_open_clip_checkpoint(None, checkpoint, prefix=prefix)
    if not projection:
        state.pop("text_projection.weight", None)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with tempfile.TemporaryDirectory() as tmp:
        CLIPTextConfig(**hf_config).save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        model, info = cls.from_pretrained(tmp, local_files_only=True, output_loading_info=True,
                                          attn_implementation="sdpa", dtype=torch.float32)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


class LDMWrapper:
    """What k-diffusion's CompVis(V)Denoiser wraps: `apply_model(x, t, cond)` and `alphas_cumprod`, here
    around a diffusers UNet and the schedule buffer stored in the checkpoint file."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor):
        self.unet, self.alphas_cumprod = unet, alphas_cumprod

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample

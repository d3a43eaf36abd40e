"""Loader nodes: a single-file SD 1.x / SD 2.x checkpoint (-> UNet, CLIP, VAE) and a standalone VAE.

Files are listed from ComfyUI's models/checkpoints and models/vae inside ComfyUI, and from
<models_dir>/checkpoints and <models_dir>/vae headless (nodes/paths.py). The checkpoint list always starts
with the built-in model, "glass-tiny (built-in)" (sd_core/builtin), which ships inside the package and is the
default: a workflow can run with no models folder at all.

The CLIP vocabulary for a checkpoint is looked up, in order: a `<checkpoint stem>.tokenizer/` folder
beside the file (vocab.json + merges.txt), a `tokenizer/` folder beside it (diffusers layout), then
sd_core.tokenizer.find_vocabulary's standard search (GLASS_DIFFUSION_CLIP_VOCAB, ComfyUI's bundled
tokenizer, the open_clip package's BPE file).
"""
from __future__ import annotations

from pathlib import Path

from . import comfy_memory, paths
from .notes import note
from .types import GLASS_CLIP, GLASS_UNET, GLASS_VAE, GlassCLIP, GlassUNet, GlassVAE, NodeInputError

CATEGORY = "Glass Diffusion/loaders"
DTYPE_CHOICES = ["auto", "fp32", "fp16", "bf16"]
SPEED_CHOICES = ["default", "none", "channels_last", "gemm_convs", "compile", "channels_last,compile"]
SPEED_TOOLTIP = ("Speed options of the same networks (the picture changes only by float rounding): default = "
                 "for SD-size models on the CPU gemm_convs (the UNet's small convolutions as matrix products) and "
                 "an NHWC VAE, on CUDA NHWC convolutions (channels_last), the plain layout for glass-tiny; compile = torch.compile "
                 "(slow first run per image size).")
DTYPE_TOOLTIP = ("Weight precision: auto = fp16 on a GPU (the VAE in fp32), fp32 on the CPU; headless, "
                 "--dtype sets what auto means.")


def _resolve(node: str, input_name: str, kind: str, name: str) -> Path:
    path = paths.full_path(kind, name)
    if path is None:
        where = "ComfyUI's models/" + kind if paths.comfy_folder_paths() else str(paths.folder(kind))
        raise NodeInputError(node, input_name, f"no file {name!r} in {where}")
    return path


def vocabulary_for(checkpoint: Path):
    """The explicit vocabulary beside a checkpoint, or None for the standard search."""
    from ..sd_core import builtin
    if checkpoint == builtin.CHECKPOINT:
        return builtin.VOCABULARY
    for candidate in (checkpoint.with_name(checkpoint.stem + ".tokenizer"), checkpoint.parent / "tokenizer"):
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
    return None


def make_tokenizer(node: str, checkpoint: Path, clip_config, recipe):
    """The checkpoint's tokenizer (padding by the family's text recipe), checked against the text model's
    vocabulary and end token."""
    from ..sd_core.tokenizer import CLIPTokenizer
    try:
        tokenizer = CLIPTokenizer(vocabulary_for(checkpoint), model_dir=checkpoint.parent, pad_id=recipe.pad_id)
    except FileNotFoundError as e:
        raise NodeInputError(node, "ckpt_name", f"no CLIP vocabulary for {checkpoint.name}: {e}") from None
    if tokenizer.vocab_size > clip_config.vocab_size or tokenizer.eos_id != clip_config.eos_token_id:
        raise NodeInputError(node, "ckpt_name",
                             f"the CLIP vocabulary {tokenizer.path} ({tokenizer.vocab_size} tokens, end token "
                             f"{tokenizer.eos_id}) does not fit the text model of {checkpoint.name} "
                             f"({clip_config.vocab_size} tokens, end token {clip_config.eos_token_id}); put the "
                             f"right vocabulary in {checkpoint.stem}.tokenizer/ beside the checkpoint")
    return tokenizer


def checkpoint_names() -> list[str]:
    """The checkpoint loader's choices: the built-in model first, then the checkpoints folder's files."""
    from ..sd_core import builtin
    return [builtin.NAME] + [n for n in paths.list_files("checkpoints") if n != builtin.NAME]


def checkpoint_path(node: str, ckpt_name: str) -> Path:
    """The file behind a checkpoint choice: the shipped file for the built-in name, else the folder's file."""
    from ..sd_core import builtin
    if ckpt_name == builtin.NAME:
        return builtin.CHECKPOINT
    path = paths.full_path("checkpoints", ckpt_name)
    if path is None:
        raise NodeInputError(node, "ckpt_name", missing_checkpoint(ckpt_name))
    return path


def missing_checkpoint(ckpt_name: str) -> str:
    """What to do about a checkpoint name the folder lacks: the file to get, the folder to put it in, and the
    choices there are (the built-in model and the folder's model files, nothing else)."""
    where = "ComfyUI's models/checkpoints folder" if paths.comfy_folder_paths() else str(paths.folder("checkpoints"))
    choices = ", ".join(repr(n) for n in checkpoint_names())
    return (f"no checkpoint {ckpt_name!r} in {where}: get that file and put it there (headless: --models DIR "
            f"names the folder holding checkpoints/), or choose one of: {choices}")


def _reader(load, path: Path, dtype, part: str = ""):
    """For ComfyUI's model management (nodes/comfy_memory.py): reads a network's weights again from its file."""
    def read():
        loaded = load(path, device="cpu", dtype=dtype)
        return (getattr(loaded, part) if part else loaded).state_dict()
    return read


def _note_emulated_bf16(node: str, device, dtype) -> None:
    import torch

    from ..sd_core.speed import cpu_has_bf16
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_bf16() is False:
        note(node, "weight_dtype", "bf16 on this CPU is emulated (it has no AVX512-BF16 or AMX instructions): "
             "slower than fp32 and less exact, so fp32 is the better choice here")


class GlassCheckpointLoader:
    @classmethod
    def INPUT_TYPES(cls):
        from ..sd_core import builtin
        return {"required": {
            "ckpt_name": (checkpoint_names(), {"default": builtin.NAME, "tooltip": "An SD 1.x or SD 2.x single-"
                          "file checkpoint (.safetensors preferred) from the checkpoints folder, or the built-in "
                          f"{builtin.NAME!r}: a tiny model that ships with Glass Diffusion, knows only simple "
                          "shape prompts ('a red circle on a blue background') and works at 64x64."}),
            "weight_dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }, "optional": {
            "speed": (SPEED_CHOICES, {"default": "default", "tooltip": SPEED_TOOLTIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name):
        """Instead of a bare 'not in the list': the file to get and where to put it (also inside ComfyUI)."""
        from ..sd_core import builtin
        if ckpt_name == builtin.NAME or paths.full_path("checkpoints", ckpt_name) is not None:
            return True
        return missing_checkpoint(ckpt_name)

    RETURN_TYPES = (GLASS_UNET, GLASS_CLIP, GLASS_VAE)
    RETURN_NAMES = ("unet", "clip", "vae")
    OUTPUT_TOOLTIPS = ("The denoising UNet with its noise schedule (4- or 9-channel inpainting).",
                       "The text encoder (CLIP, or OpenCLIP for SD 2.x) with its tokenizer.",
                       "The autoencoder between pixels and latents.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads an SD 1.x or SD 2.x checkpoint into Glass Diffusion's own UNet, text encoder and VAE."

    def load(self, ckpt_name, weight_dtype="auto", speed="default"):
        from ..sd_core import builtin
        from ..sd_core import speed as speed_options
        from ..sd_core.checkpoint import load_checkpoint
        from ..sd_core.diffusion import DiffusionModel
        node = "GlassCheckpointLoader"
        if weight_dtype not in DTYPE_CHOICES:
            raise NodeInputError(node, "weight_dtype", f"{weight_dtype!r} is not one of {DTYPE_CHOICES}")
        if speed not in SPEED_CHOICES:
            raise NodeInputError(node, "speed", f"{speed!r} is not one of {SPEED_CHOICES}")
        path = checkpoint_path(node, ckpt_name)
        device, dtype = paths.device_and_dtype(weight_dtype)
        _note_emulated_bf16(node, device, dtype)
        sd = load_checkpoint(path, device=device, dtype=dtype)  # the file's own errors name it: not wrapped
        speed_options.apply(sd, speed_options.SpeedOptions.parse(speed, device, sd.config.unet.model_channels))
        tokenizer = make_tokenizer(node, path, sd.config.clip, sd.family.text[0])
        source = ckpt_name if path == builtin.CHECKPOINT else path.name
        unet = GlassUNet(DiffusionModel.from_checkpoint(sd, source=source))
        clip = GlassCLIP(sd.clip, tokenizer, clip_skip=sd.family.text[0].default_layer,
                         embeddings_dir=paths.embeddings_dir(), source=source)
        vae_model = sd.vae.to(paths.vae_dtype(weight_dtype, dtype))
        vae = GlassVAE(vae_model, source=source)
        for net, part, kind in ((sd.unet, "unet", "unet"), (sd.clip, "clip", "text_encoder"), (vae_model, "vae", "vae")):
            comfy_memory.register(net, _reader(load_checkpoint, path, dtype, part), kind)  # inside ComfyUI only
        return (unet, clip, vae)


class GlassVAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (paths.list_files("vae"), {"tooltip": "A standalone SD 1.x VAE file (or a full checkpoint) "
                         "from the vae folder."}),
            "weight_dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    RETURN_TYPES = (GLASS_VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The autoencoder, to use instead of a checkpoint's own VAE.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a standalone VAE (e.g. the improved ft-MSE VAE) for Glass Diffusion's encode/decode nodes."

    def load(self, vae_name, weight_dtype="auto"):
        from ..sd_core.checkpoint import load_vae
        node = "GlassVAELoader"
        if weight_dtype not in DTYPE_CHOICES:
            raise NodeInputError(node, "weight_dtype", f"{weight_dtype!r} is not one of {DTYPE_CHOICES}")
        path = _resolve(node, "vae_name", "vae", vae_name)
        device, dtype = paths.device_and_dtype(weight_dtype)
        dtype = paths.vae_dtype(weight_dtype, dtype)
        vae = load_vae(path, device=device, dtype=dtype)
        comfy_memory.register(vae, _reader(load_vae, path, dtype), "vae")  # inside ComfyUI only
        return (GlassVAE(vae, source=path.name),)


NODE_CLASS_MAPPINGS = {"GlassCheckpointLoader": GlassCheckpointLoader, "GlassVAELoader": GlassVAELoader}
NODE_DISPLAY_NAME_MAPPINGS = {"GlassCheckpointLoader": "Load Checkpoint (Glass)", "GlassVAELoader": "Load VAE (Glass)"}

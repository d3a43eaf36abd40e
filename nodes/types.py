"""Our own model-object types, passed between Glass nodes.

ComfyUI's MODEL / CLIP / VAE are ComfyUI classes, so our objects carry their own type names: the editor
then refuses to wire a Glass UNet into a ComfyUI KSampler (which would crash). IMAGE, MASK, LATENT,
CONDITIONING and SIGMAS are plain tensors / dicts / lists in ComfyUI's exact formats (see README).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


# Socket type names (permanent: saved workflows name them in their links).
GLASS_UNET = "GLASS_UNET"
GLASS_CLIP = "GLASS_CLIP"
GLASS_VAE = "GLASS_VAE"
GLASS_SAMPLER = "GLASS_SAMPLER"
# ComfyUI's own data types, shared as-is.
IMAGE, MASK, LATENT, CONDITIONING, SIGMAS = "IMAGE", "MASK", "LATENT", "CONDITIONING", "SIGMAS"


class NodeInputError(ValueError):
    """A node input is invalid. The message names the node and the input."""

    def __init__(self, node: str, input_name: str, message: str):
        ValueError.__init__(self, f"{node}: input '{input_name}': {message}")  # not super(): see as_input_error
        self.node, self.input_name = node, input_name


_AS_INPUT_ERROR: dict = {}


def as_input_error(node: str, input_name: str, error: ValueError) -> NodeInputError:
    """A NodeInputError for `error` that is still an instance of the error's own class (CheckpointError,
    ParamError, ...), with its attributes; the original is its __cause__ when raised `from error`."""
    cls = type(error)
    if isinstance(error, NodeInputError):
        return error
    mixed = _AS_INPUT_ERROR.get(cls)
    if mixed is None:
        mixed = _AS_INPUT_ERROR[cls] = type(cls.__name__, (NodeInputError, cls), {"__module__": cls.__module__})
    err = mixed.__new__(mixed)
    err.__dict__.update(error.__dict__)
    NodeInputError.__init__(err, node, input_name, str(error))
    return err


@contextlib.contextmanager
def node_inputs(node: str, path_input: Optional[str] = None, **param_inputs: str):
    """Translate sd_core errors raised inside the block into NodeInputError(node, input), keeping their class:
    a ParamError's `.param` names the input (`param_inputs` maps parameter -> input name where they differ), a
    CheckpointError belongs to `path_input`."""
    from ..sd_core.errors import CheckpointError, ParamError  # here: importing the pack loads no sd_core module
    try:
        yield
    except ParamError as e:
        raise as_input_error(node, param_inputs.get(e.param, e.param), e) from e
    except CheckpointError as e:
        if path_input is None:
            raise
        raise as_input_error(node, path_input, e) from e


def _describe(module: torch.nn.Module) -> str:
    """Device and dtype of a module's weights, for short reprs."""
    p = next(module.parameters(), None)
    return "no weights" if p is None else f"{p.device.type} {str(p.dtype).removeprefix('torch.')}"


@dataclass(frozen=True, eq=False)
class GlassUNet:
    """GLASS_UNET: the socket type of the sd_core model handle. `model` is a `sd_core.diffusion.DiffusionModel`
    (UNet, family, sampling, latent format, patches): nodes hand it to sd_core as it is. The copies below share
    the weights."""
    model: Any

    def __repr__(self) -> str:  # ComfyUI puts str(input) in error reports: never the whole module tree
        return f"GlassUNet({self.model.source or 'unnamed'}, {self.in_channels}-channel, {_describe(self.model.unet)})"

    def with_patches(self, patches) -> "GlassUNet":
        return GlassUNet(self.model.with_patches(patches))

    def with_sampling(self, sampling) -> "GlassUNet":
        return GlassUNet(self.model.with_sampling(sampling))

    def replace(self, **changes) -> "GlassUNet":
        return GlassUNet(self.model.replace(**changes))

    @property
    def family(self):
        return self.model.family

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def is_inpaint(self) -> bool:
        return self.model.is_inpaint

    @property
    def scaling_factor(self) -> float:
        return self.model.scaling_factor

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


@dataclass
class GlassCLIP:
    """The CLIP text encoder, its tokenizer and encode settings (GLASS_CLIP)."""
    model: torch.nn.Module            # sd_core.clip.CLIPTextModel
    tokenizer: Any                    # sd_core.tokenizer.CLIPTokenizer
    clip_skip: int = -1               # -1 = last layer, -2 = penultimate (final LayerNorm applied)
    embeddings_dir: Optional[str] = None
    source: str = ""
    patches: tuple = ()               # sd_core.lora.LoraPatch, applied in order when encoding

    def with_patches(self, patches) -> "GlassCLIP":
        """A copy with these weight patches; the loaded weights are shared, never changed."""
        return dataclasses.replace(self, patches=tuple(patches))

    def patched_model(self) -> torch.nn.Module:
        """The text encoder with the patches applied (a copy-on-write view, computed once per handle)."""
        from ..sd_core.lora import view_for
        return view_for(self, self.model, self.patches)

    def __repr__(self) -> str:
        return f"GlassCLIP({self.source or 'unnamed'}, clip_skip={self.clip_skip}, {_describe(self.model)})"

    def with_clip_skip(self, clip_skip: int) -> "GlassCLIP":
        """A copy with another clip skip; the weights are shared, not copied."""
        return dataclasses.replace(self, clip_skip=clip_skip)


@dataclass
class GlassVAE:
    """The autoencoder (GLASS_VAE). LATENTs stay unscaled: the scaling factor is the samplers' business."""
    model: torch.nn.Module            # sd_core.vae.AutoencoderKL
    downscale: int = 8
    source: str = ""

    def __repr__(self) -> str:
        return f"GlassVAE({self.source or 'unnamed'}, {_describe(self.model)})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


@dataclass
class GlassSampler:
    """A sampler choice (GLASS_SAMPLER): a name from sd_core.samplers plus its options."""
    name: str
    options: dict = field(default_factory=dict)

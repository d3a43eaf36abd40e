"""Text nodes: prompt encoding (ComfyUI or AUTOMATIC1111 weighting) and clip skip."""
from __future__ import annotations

from . import comfy_memory
from .types import CONDITIONING, GLASS_CLIP, GlassCLIP, NodeInputError, node_inputs
from .notes import note

CATEGORY = "Glass Diffusion/text"
WEIGHTINGS = ("comfy", "a1111")  # sd_core.conditioning.WEIGHTINGS (a test checks they agree)


def check_clip(node: str, clip) -> GlassCLIP:
    if not isinstance(clip, GlassCLIP):
        raise NodeInputError(node, "clip", f"expected a GLASS_CLIP (from a Glass checkpoint loader), got "
                                           f"{type(clip).__name__}")
    return clip


def note_unknown_words(node: str, clip: GlassCLIP, text: str) -> None:
    """The built-in model knows only its toy grammar: a note listing the prompt's words its vocabulary lacks."""
    from ..sd_core import builtin
    unknown = clip.tokenizer.unknown_words(text) if clip.source == builtin.NAME else []
    if unknown:
        note(node, "text", f"the built-in model does not know the word{'s' * (len(unknown) > 1)} "
                           f"{', '.join(map(repr, unknown))}; it knows only prompts such as "
                           f"{builtin.EXAMPLE_PROMPTS[0]!r} (see its model card), so the picture will not follow them")


class GlassTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": (GLASS_CLIP, {"tooltip": "The text encoder (from the checkpoint loader or a clip skip node)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip":
                     "The prompt. (word) weighs 1.1x, (word:1.3) sets a weight, \\( \\) are literal brackets, "
                     "embedding:name inserts a textual-inversion embedding."}),
            "weighting": (list(WEIGHTINGS), {"default": "comfy", "tooltip":
                          "comfy: weights interpolate from the empty prompt's encoding (ComfyUI). "
                          "a1111: weights multiply, then the mean is restored (AUTOMATIC1111)."}),
        }}

    RETURN_TYPES = (CONDITIONING,)
    OUTPUT_TOOLTIPS = ("The encoded prompt, [[z [1, 77k, 768], {'pooled_output': ...}]], usable by ComfyUI's "
                       "conditioning nodes too.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes a prompt with the CLIP text encoder, in 77-token windows, with prompt weighting."

    def encode(self, clip, text, weighting="comfy"):
        from ..sd_core.conditioning import encode_prompt
        from ..sd_core.errors import ParamError
        node = "GlassTextEncode"
        clip = check_clip(node, clip)
        comfy_memory.use(clip.model)  # inside ComfyUI: loaded by its model management
        if not isinstance(text, str):
            raise NodeInputError(node, "text", f"expected a string, got {type(text).__name__}")
        # the clip skip and the tokenizer travel in the clip input; the prompt's own problems are the text's
        with node_inputs(node, clip_skip="clip", tokenizer="clip", windows="text"):
            try:
                cond = encode_prompt(clip.patched_model(), clip.tokenizer, text, clip_skip=clip.clip_skip,
                                     weighting=weighting, embeddings_dir=clip.embeddings_dir)
            except ParamError:
                raise
            except (ValueError, FileNotFoundError, KeyError) as e:  # bad weight syntax, unknown embedding, ...
                raise NodeInputError(node, "text", str(e)) from e
        note_unknown_words(node, clip, text)
        return (cond,)


class GlassClipSkip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": (GLASS_CLIP, {"tooltip": "The text encoder."}),
            "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1, "tooltip":
                                   "-1 = last layer (default), -2 = penultimate ('clip skip 2'), ... "
                                   "The final LayerNorm is applied to the chosen layer."}),
        }}

    RETURN_TYPES = (GLASS_CLIP,)
    OUTPUT_TOOLTIPS = ("The same text encoder, reading its output from an earlier layer.",)
    FUNCTION = "set_layer"
    CATEGORY = CATEGORY
    DESCRIPTION = "Clip skip: take the prompt encoding from an earlier CLIP layer (as CLIPSetLastLayer)."

    def set_layer(self, clip, stop_at_clip_layer):
        node = "GlassClipSkip"
        clip = check_clip(node, clip)
        layers = clip.model.config.layers
        if not (-layers <= stop_at_clip_layer <= -1):
            raise NodeInputError(node, "stop_at_clip_layer",
                                 f"must be in -{layers}..-1 for this {layers}-layer text encoder, got {stop_at_clip_layer}")
        return (clip.with_clip_skip(stop_at_clip_layer),)


NODE_CLASS_MAPPINGS = {"GlassTextEncode": GlassTextEncode, "GlassClipSkip": GlassClipSkip}
NODE_DISPLAY_NAME_MAPPINGS = {"GlassTextEncode": "Text Encode (Glass)", "GlassClipSkip": "Clip Skip (Glass)"}

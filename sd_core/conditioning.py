"""Prompt -> ComfyUI CONDITIONING: `[[z [1, 77k, D], {"pooled_output": pooled [1, D]}]]`.

Steps, as ComfyUI's CLIPTextEncode for SD 1.x does them:
1. `prompt.prompt_windows`: weights, embeddings, 77-token windows.
2. All windows run through CLIP in one batch; the output of layer `clip_skip` (-1 last, -2 penultimate,
   ...) with the final LayerNorm applied. Textual-inversion vectors replace token embeddings in place
   (position embeddings still added). A vector whose width is not the model's is dropped with a
   warning and the window is topped up with a pad token at its end; the weights stay tied to the
   original positions (ComfyUI's rule, which decides the tensor in that case).
3. Weights, "comfy" (default): only if some token has weight != 1, the empty prompt
   [start, end, pad x75] is encoded in the same batch with the same clip skip, and every token with
   weight w != 1 becomes z_empty + (z - z_empty) * w, position by position.
   "a1111": per window z * w, then scaled by mean(z before) / mean(z after) (AUTOMATIC1111's
   "restore the mean"); it uses the same prompt syntax and windows as "comfy".
4. Windows are concatenated on the token axis; pooled_output is the FIRST window's pooled vector
   (the last layer, final-normed, at the first end token, whatever the clip skip).
"""
import logging
from typing import Optional

import torch

from .errors import ParamError
from .prompt import WINDOW, Dirs, EmbeddingVector, prompt_windows

log = logging.getLogger(__name__)

WEIGHTINGS = ("comfy", "a1111")


def _window_inputs(windows: list, width: int, pad: int, eos: int) -> tuple:
    """ids [k, 77] long, {(row, position): vector}, weights [k, 77] float64 (by original position)."""
    placeholder = 0 if eos != 0 else 1  # any id but the end token: pooling looks for the first end token
    ids, vectors, weights, warned = [], {}, [], set()
    for k, window in enumerate(windows):
        row, dropped = [], 0
        for tok, _ in window:
            if isinstance(tok, EmbeddingVector):
                if tok.vector.shape[-1] != width:
                    dropped += 1
                    if tok.name not in warned:
                        warned.add(tok.name)
                        log.warning("embedding:%s has width %d but this CLIP has %d; left out",
                                    tok.name, tok.vector.shape[-1], width)
                    continue
                vectors[(k, len(row))] = tok.vector
                row.append(placeholder)
            else:
                row.append(int(tok))
        ids.append(row + [pad] * dropped)
        weights.append([float(w) for _, w in window])
    return torch.tensor(ids, dtype=torch.long), vectors, torch.tensor(weights, dtype=torch.float64)


@torch.no_grad()
def encode_windows(clip_model, windows: list, *, bos: int, eos: int, pad: int, clip_skip: int = -1,
                   weighting: str = "comfy") -> tuple:
    """(z [1, 77k, D] float32, pooled [1, D] float32) for windows of (token, weight) pairs."""
    if weighting not in WEIGHTINGS:
        raise ParamError("weighting", f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    cfg = clip_model.config
    if not -cfg.layers <= clip_skip <= -1:
        raise ParamError("clip_skip", f"clip_skip must be in -{cfg.layers}..-1 (-1 = last layer), got {clip_skip}")
    if eos != cfg.eos_token_id:
        raise ParamError("tokenizer", f"tokenizer end token {eos} is not the CLIP model's end token "
                                      f"{cfg.eos_token_id}; tokenizer and model come from different vocabularies")
    param = next(clip_model.parameters())
    ids, vectors, weights = _window_inputs(windows, cfg.width, pad, eos)
    if any(len(w) != WINDOW for w in windows) or int(ids.max()) >= cfg.vocab_size:
        raise ParamError("windows", f"windows must be {WINDOW} ids below the model's vocabulary size "
                                    f"{cfg.vocab_size}")
    sections = ids.shape[0]
    has_weights = bool((weights != 1.0).any())
    if weighting == "comfy" and has_weights:  # the empty prompt, encoded alongside with the same clip skip
        empty = torch.tensor([[bos, eos] + [pad] * (WINDOW - 2)], dtype=torch.long)
        ids = torch.cat([ids, empty])  # (k, 77) -> (k+1, 77)
    ids = ids.to(param.device)

    embeds = None
    if vectors:
        embeds = clip_model.embed_tokens(ids)  # (B, 77) -> (B, 77, D)
        for (k, pos), v in vectors.items():
            embeds[k, pos] = v.to(device=embeds.device, dtype=embeds.dtype)
    out = clip_model(ids, inputs_embeds=embeds, layer=clip_skip)
    z, pooled = out.z.float(), out.pooled[:1].float()  # (B, 77, D), (1, D): first window's pooled

    zw = z[:sections]  # (k, 77, D)
    w = weights.to(device=z.device, dtype=torch.float32)[..., None]  # (k, 77, 1)
    if weighting == "comfy" and has_weights:
        z_empty = z[sections:]  # (1, 77, D)
        changed = (weights != 1.0).to(z.device)[..., None]  # decided on the float64 weights
        zw = torch.where(changed, (zw - z_empty) * w + z_empty, zw)
    elif weighting == "a1111":
        mean_before = zw.mean(dim=(1, 2), keepdim=True)  # per window, over tokens and channels
        zw = zw * w
        zw = zw * (mean_before / zw.mean(dim=(1, 2), keepdim=True))
    return zw.reshape(1, -1, zw.shape[-1]), pooled  # (k, 77, D) -> (1, 77k, D)


def encode_prompt(clip_model, tokenizer, text: str, *, clip_skip: int = -1, weighting: str = "comfy",
                  embeddings_dir: Dirs = None, windows: Optional[list] = None) -> list:
    """CONDITIONING for `text`: `[[z [1, 77k, D] float32, {"pooled_output": [1, D] float32}]]`.

    clip_model: sd_core.clip.CLIPTextModel; tokenizer: sd_core.tokenizer.CLIPTokenizer (same vocabulary).
    clip_skip: -1 (last layer) .. -layers. weighting: "comfy" or "a1111".
    embeddings_dir: folder (or folders) searched for `embedding:name`; None encodes such words as text.
    windows: precomputed `prompt.prompt_windows(...)` output (then `text` is not parsed).
    """
    if windows is None:
        windows = prompt_windows(text, tokenizer, embeddings_dir, clip_model.config.width)
    z, pooled = encode_windows(clip_model, windows, bos=tokenizer.bos_id, eos=tokenizer.eos_id,
                               pad=tokenizer.pad_id, clip_skip=clip_skip, weighting=weighting)
    return [[z, {"pooled_output": pooled}]]

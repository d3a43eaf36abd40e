"""OpenCLIP ViT-H/14 text encoder (the text tower SD 2.x conditions on).

Attribute names are the LDM checkpoint's (`cond_stage_model.model.` + `token_embedding`, `positional_embedding`,
`transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`, `logit_scale`),
so a file loads with one `load_state_dict`. The attention keeps the file's packed input projection
`attn.in_proj_weight` [3D, D] as one parameter; q, k and v are its three row blocks, split at run time.

Differences from CLIP ViT-L/14 (sd_core/clip.py): exact GELU instead of quick-GELU, a learned [T, D] position
table, the packed projection, and a text projection (pooled @ text_projection) applied to the pooled vector.
The forward has CLIPTextModel's contract (`layer`, `inputs_embeds`, `CLIPOutput`), so prompt encoding does
not care which encoder it holds.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .clip import CLIPOutput


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407  # SD 2.x pads with 0, not with this (the family's TextRecipe.pad_id)
    projection_dim: int = 1024

    @classmethod
    def tiny(cls, **kw) -> "OpenCLIPTextConfig":
        return cls(**{**dict(vocab_size=1000, width=32, layers=3, heads=2, mlp_width=64, bos_token_id=998,
                             eos_token_id=999, projection_dim=32), **kw})


class PackedSelfAttention(nn.Module):
    """`attn`: nn.MultiheadAttention's parameter layout (in_proj_weight, in_proj_bias, out_proj), causal."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * cfg.width, cfg.width) * cfg.width ** -0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # (B, T, 3D) -> 3 x (B, T, D)
        return self.out_proj(attention(q, k, v, self.heads, causal=True))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, T, D) -> (B, T, M) -> (B, T, D), exact (erf) GELU


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = PackedSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # pre-norm, causal self attention
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(cfg) for _ in range(cfg.layers)])


class OpenCLIPTextModel(nn.Module):
    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        cfg = self.config = config
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.max_positions, cfg.width) * 0.01)
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = nn.Parameter(torch.randn(cfg.width, cfg.projection_dim) * cfg.width ** -0.5)  # x @ P
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))  # CLIP's temperature: kept, not used here

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T] -> [B, T, D] (no positions), for textual-inversion vectors put in place."""
        return self.token_embedding(ids)

    def forward(self, input_ids: torch.Tensor, inputs_embeds: Optional[torch.Tensor] = None,
                layer: int = -1, output_hidden_states: bool = False) -> CLIPOutput:
        """z: the chosen layer's output (-1 last, -2 penultimate: SD 2.x's) with ln_final applied; pooled: the
        final-normed last layer at the first end token, projected by text_projection."""
        cfg = self.config
        B, T = input_ids.shape
        if not 1 <= T <= cfg.max_positions:
            raise ValueError(f"OpenCLIP takes 1..{cfg.max_positions} tokens, got {T}")
        if not -cfg.layers <= layer <= -1:
            raise ValueError(f"layer must be in -{cfg.layers}..-1 (clip skip), got {layer}")
        if inputs_embeds is not None and inputs_embeds.shape != (B, T, cfg.width):
            raise ValueError(f"inputs_embeds must be {(B, T, cfg.width)}, got {tuple(inputs_embeds.shape)}")

        x = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T) -> (B, T, D)
        x = x.to(self.positional_embedding.dtype) + self.positional_embedding[:T]  # + (T, D)
        hidden = [x]
        for block in self.transformer.resblocks:
            x = block(x)  # (B, T, D)
            hidden.append(x)

        z = self.ln_final(hidden[layer])  # (B, T, D)
        last = z if layer == -1 else self.ln_final(x)
        is_eos = input_ids == cfg.eos_token_id  # (B, T): the first end token (OpenCLIP: argmax of the ids)
        eos_pos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), T - 1)  # (B,)
        pooled = last[torch.arange(B, device=last.device), eos_pos] @ self.text_projection  # (B, D) @ (D, P) -> (B, P)
        return CLIPOutput(z, pooled, tuple(hidden) if output_hidden_states else None)


class FrozenOpenCLIPEmbedder(nn.Module):
    """`cond_stage_model.` level of an SD 2.x checkpoint: holds the text encoder as `model`."""

    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.model = OpenCLIPTextModel(config)

    @property
    def encoder(self) -> OpenCLIPTextModel:
        return self.model

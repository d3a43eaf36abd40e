"""CLIP ViT-L/14 text encoder (the text tower SD 1.x conditions on).

Attribute names are Hugging Face's `CLIPTextModel` names, which the single-file checkpoint keeps under
`cond_stage_model.transformer.`, so the weights load with one `load_state_dict`.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from .attention import attention


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407  # SD 1.x also pads with it

    @classmethod
    def tiny(cls, **kw) -> "CLIPTextConfig":
        return cls(**{**dict(vocab_size=1000, width=32, layers=2, heads=2, mlp_width=64,
                             bos_token_id=998, eos_token_id=999), **kw})


class CLIPOutput(NamedTuple):
    z: torch.Tensor  # [B, T, D] output of the chosen layer, final LayerNorm applied
    pooled: torch.Tensor  # [B, D] final-normed last layer at the first end token
    hidden_states: Optional[tuple]  # (embeddings, layer 1, ..., layer N), no final norm; or None


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        # persistent: real checkpoints carry it, and loading with assign=True must find it
        self.register_buffer("position_ids", torch.arange(cfg.max_positions).unsqueeze(0), persistent=True)

    def forward(self, input_ids: torch.Tensor, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)  # (B, T) -> (B, T, D)
        inputs_embeds = inputs_embeds.to(self.position_embedding.weight.dtype)
        positions = self.position_embedding(self.position_ids[:, :T].long())  # (1, T, D)
        return inputs_embeds + positions  # (B, T, D)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # 3 x (B, T, D)
        return self.out_proj(attention(q, k, v, self.heads, causal=True))  # (B, T, D)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)  # (B, T, D) -> (B, T, M)
        x = x * torch.sigmoid(1.702 * x)  # quick-GELU
        return self.fc2(x)  # (B, T, M) -> (B, T, D)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # pre-norm, causal self attention
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T] -> [B, T, D] (no positions), for textual-inversion vectors put in place."""
        return self.text_model.embeddings.token_embedding(ids)

    def forward(self, input_ids: torch.Tensor, inputs_embeds: Optional[torch.Tensor] = None,
                layer: int = -1, output_hidden_states: bool = False) -> CLIPOutput:
        cfg, tm = self.config, self.text_model
        B, T = input_ids.shape
        if not 1 <= T <= cfg.max_positions:
            raise ValueError(f"CLIP takes 1..{cfg.max_positions} tokens, got {T}")
        if not -cfg.layers <= layer <= -1:
            raise ValueError(f"layer must be in -{cfg.layers}..-1 (clip skip), got {layer}")
        if inputs_embeds is not None and inputs_embeds.shape != (B, T, cfg.width):
            raise ValueError(f"inputs_embeds must be {(B, T, cfg.width)}, got {tuple(inputs_embeds.shape)}")

        x = tm.embeddings(input_ids, inputs_embeds)  # (B, T) -> (B, T, D)
        hidden = [x]
        for block in tm.encoder.layers:
            x = block(x)  # (B, T, D)
            hidden.append(x)

        z = tm.final_layer_norm(hidden[layer])  # clip skip: layer -1 is the last layer
        last = z if layer == -1 else tm.final_layer_norm(x)  # (B, T, D)
        # first end token per row (argmax returns the first maximum); rows without one use the last position
        is_eos = input_ids == cfg.eos_token_id  # (B, T)
        eos_pos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), T - 1)  # (B,)
        pooled = last[torch.arange(B, device=last.device), eos_pos]  # (B, T, D) -> (B, D)
        return CLIPOutput(z, pooled, tuple(hidden) if output_hidden_states else None)

"""CLIP ViT-L/14 text encoder (the text tower SD 1.x conditions on)."""
from dataclasses import dataclass


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

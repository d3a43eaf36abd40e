"""The one attention function every network uses (CLIP, UNet transformer blocks, VAE mid block).

Built on `F.scaled_dot_product_attention`, so no [L, L] score matrix is ever materialised by us:
PyTorch picks a flash / memory-efficient kernel where it can.
"""
import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False,
              upcast: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention on already projected inputs.

    q: [B, Lq, D], k and v: [B, Lk, D] (self attention: the same length; cross attention: any).
    `causal` masks key positions after each query position (CLIP's text tower). `upcast` computes in float32
    and returns the inputs' dtype (SD 2.x, whose fp16 attention overflows). Returns [B, Lq, D].
    """
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    B, Lq, D = q.shape
    Lk = k.shape[1]
    assert D % heads == 0, f"width {D} is not divisible by {heads} heads"
    dh = D // heads
    q = q.view(B, Lq, heads, dh).transpose(1, 2)  # (B, Lq, D) -> (B, H, Lq, D/H)
    k = k.view(B, Lk, heads, dh).transpose(1, 2)  # (B, Lk, D) -> (B, H, Lk, D/H)
    v = v.view(B, Lk, heads, dh).transpose(1, 2)  # (B, Lk, D) -> (B, H, Lk, D/H)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, Lq, D/H)
    return out.transpose(1, 2).reshape(B, Lq, D).to(dtype)  # (B, H, Lq, D/H) -> (B, Lq, D)

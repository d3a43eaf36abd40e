"""Which word painted which pixels: cross-attention maps recorded while sampling (the method of DAAM, Tang et
al. 2023, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention"), and the prompt's tokens mapped
back to the words the user typed.

Recording is scoped, not global: `with AttentionRecorder(positive_context, batch, latent_hw) as rec:` makes
`rec` the current recorder of this context (a ContextVar, so two runs in two threads do not see each other's)
and every UNet cross-attention layer (`unet.CrossAttention.forward`) hands it its projected queries and keys.
With no recorder the layer runs exactly as before (the same kernels, one ContextVar read); with one, the
layer's own output is still computed by `attention.attention` unchanged, and the recorder computes on the side,
for the positive rows of the batch only,

    P = softmax(Q K^T / sqrt(d_head))      # (n, heads, HW, T) for the n positive rows, float32
    sums[HxW] += mean over heads of P       # (B, T, H, W): one running sum per feature-map size

so memory is one [B, T, H, W] float32 sum per resolution (SD 1.5 at 512 px: 64^2 + 32^2 + 16^2 + 8^2 = 5,440
cells x 77 tokens x 4 B = 1.6 MiB per picture and 77-token window) plus the transient P of one layer; nothing
is kept per step or per layer. `token_maps(size)` upsamples each sum (bilinear) to the picture and averages
over every (layer, UNet call) contribution.

Which rows are positive: the recorder holds the positive CONDITIONING's context [Bp, T, D]; a batch row whose
context is that row's context (tokens possibly repeated to a common length by guidance, which leaves
attention unchanged and is folded back) is a positive row, and batch row r belongs to picture r % B (guidance
stacks every conditioning's B rows in picture order). The ControlNet's own cross-attention is not recorded
(`paused()` around its call).

Words: `prompt_words` walks the prompt exactly as `prompt.prompt_windows` does (weights, embeddings, 77-token
windows) and tags every token with the typed word it came from: a word is a run of tokenizer pieces with no
space between them that holds a letter or digit (`lighthouse` -> `light` + `house</w>` is one word; leading and
trailing punctuation is not part of it), an embedding is one word `embedding:NAME`. Start, end and padding
tokens belong to no word.
"""
from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .prompt import (EMBEDDING_PREFIX, Dirs, EmbeddingVector, _embedding_piece, pack_windows, parse_weights,
                     split_embeddings)

_ACTIVE: ContextVar[Optional["AttentionRecorder"]] = ContextVar("glass_attention_recorder", default=None)


def recording() -> Optional["AttentionRecorder"]:
    """The recorder of this context, or None (the common case: nothing is recorded)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def paused():
    """No recording inside the block (a ControlNet's cross-attention is not the UNet's)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head)) averaged over heads, in float32: q [n, Lq, D], k [n, Lk, D] -> [n, Lq, Lk]."""
    n, Lq, D = q.shape
    Lk = k.shape[1]
    dh = D // heads
    q = q.float().reshape(n, Lq, heads, dh).transpose(1, 2)  # (n, Lq, D) -> (n, H, Lq, dh)
    k = k.float().reshape(n, Lk, heads, dh).transpose(1, 2)  # (n, Lk, D) -> (n, H, Lk, dh)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))  # (n, H, Lq, Lk)
    return scores.softmax(dim=-1).mean(dim=1)  # (n, H, Lq, Lk) -> (n, Lq, Lk)


def feature_sizes(h: int, w: int, levels: int = 8) -> dict:
    """{H * W: (H, W)} of the UNet's feature maps for a latent h x w (each stride-2 conv: ceil(size / 2))."""
    out = {}
    for _ in range(levels):
        out.setdefault(h * w, (h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


class AttentionRecorder:
    """Running sums of cross-attention probabilities per prompt token, for the positive rows of a sampling run.

    positive_context: the positive CONDITIONING's tensor [Bp, T, D] (Bp = 1 or the batch); batch: the latent
    batch B; latent_hw: the latent's (h, w).
    """

    def __init__(self, positive_context: torch.Tensor, batch: int, latent_hw: tuple):
        if positive_context.ndim != 3:
            raise ValueError(f"positive context must be [B, T, D], got {tuple(positive_context.shape)}")
        self.ref = positive_context.detach()
        self.batch = int(batch)
        self.tokens = positive_context.shape[1]
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.sizes = feature_sizes(*self.latent_hw)
        self.sums: dict = {}    # (H, W) -> [B, T, H, W] float32
        self.counts: dict = {}  # (H, W) -> [B] float64: contributions (layer x UNet call) per picture
        self.calls = 0          # layer calls that recorded something
        self._refs: dict = {}   # (dtype, device) -> the reference rows [B, T, D], cast once
        self._last = None       # (context, rows, pictures) of the last context seen
        self._token = None

    # ---- scope
    def __enter__(self) -> "AttentionRecorder":
        if self._token is not None:
            raise RuntimeError("this recorder is already recording")
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self._token = None
        self._last = None  # drop the reference to the last context

    # ---- recording (called by unet.CrossAttention.forward)
    def _reference(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        ref = self._refs.get(key)
        if ref is None:
            r = self.ref.to(device=like.device, dtype=like.dtype)
            idx = torch.arange(self.batch) % r.shape[0]
            ref = self._refs[key] = r[idx]  # (B, T, D)
        return ref

    def _positive_rows(self, context: torch.Tensor) -> tuple:
        if self._last is not None and self._last[0] is context:  # every layer of one UNet call shares it
            return self._last[1], self._last[2]
        N, Tc, D = context.shape
        rows = []
        if Tc % self.tokens == 0 and D == self.ref.shape[2]:
            ref, m = self._reference(context), Tc // self.tokens
            for r in range(N):
                row = context[r].reshape(m, self.tokens, D)
                if torch.equal(row, ref[r % self.batch].expand(m, -1, -1)):
                    rows.append(r)
        pictures = torch.tensor([r % self.batch for r in rows], dtype=torch.long, device=context.device)
        self._last = (context, rows, pictures)
        return rows, pictures

    def observe(self, q: torch.Tensor, k: torch.Tensor, context: torch.Tensor, heads: int) -> None:
        """One cross-attention layer call: q [N, HW, D] and k [N, Tc, D] (projected), context [N, Tc, Dc]."""
        size = self.sizes.get(q.shape[1])
        if size is None:
            return
        rows, pictures = self._positive_rows(context)
        if not rows:
            return
        with torch.no_grad():
            idx = torch.tensor(rows, device=q.device)
            p = attention_probs(q.index_select(0, idx), k.index_select(0, idx), heads)  # (n, HW, Tc)
            n, hw, Tc = p.shape
            if Tc != self.tokens:  # tokens repeated to a common length: fold the copies back onto their token
                p = p.reshape(n, hw, Tc // self.tokens, self.tokens).sum(dim=2)  # (n, HW, T)
            maps = p.transpose(1, 2).reshape(n, self.tokens, *size)  # (n, HW, T) -> (n, T, H, W)
            if size not in self.sums:
                self.sums[size] = torch.zeros(self.batch, self.tokens, *size, device=q.device)
                self.counts[size] = torch.zeros(self.batch, dtype=torch.float64, device=q.device)
            self.sums[size].index_add_(0, pictures.to(q.device), maps)
            self.counts[size].index_add_(0, pictures.to(q.device),
                                         torch.ones(n, dtype=torch.float64, device=q.device))
        self.calls += 1

    # ---- results
    def memory_bytes(self) -> int:
        """Bytes held by the running sums."""
        return sum(s.numel() * s.element_size() for s in self.sums.values())

    def token_maps(self, size: tuple) -> torch.Tensor:
        """[B, T, H, W] float32 on the CPU: each token's attention, averaged over heads, layers and UNet calls
        (every resolution's sum upsampled bilinearly to `size` = (H, W)). Zeros where nothing was recorded."""
        H, W = int(size[0]), int(size[1])
        total = torch.zeros(self.batch, self.tokens, H, W)
        count = torch.zeros(self.batch, dtype=torch.float64)
        for key, s in self.sums.items():
            up = F.interpolate(s.float().cpu(), size=(H, W), mode="bilinear", align_corners=False)
            total += up
            count += self.counts[key].cpu()
        return total / count.clamp(min=1).to(torch.float32).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- tokens -> typed words

@dataclass(frozen=True)
class Word:
    """A word of the prompt as typed: its text, a unique label (`red`, `red (2)` for a second `red`) and the
    positions of its tokens in the concatenated windows (window k, position p -> 77 k + p)."""
    text: str
    label: str
    positions: tuple


def _piece_words(tokenizer, piece: str) -> list:
    """[(token id, (word number in the piece, word text) or None)] for one text piece (module notes)."""
    ids = tokenizer.encode(piece)
    split = getattr(tokenizer, "pieces", None)
    parts = split(piece) if split is not None else None
    per = [tokenizer.encode(p) for p, _, _ in parts] if parts else None
    if not parts or [i for ids_p in per for i in ids_p] != ids:  # no usable offsets: one word per token
        texts = [tokenizer.decode([i]).strip() if hasattr(tokenizer, "decode") else str(i) for i in ids]
        return [(i, (n, t) if any(c.isalnum() for c in t) else None) for n, (i, t) in enumerate(zip(ids, texts))]
    cleaned = tokenizer.clean(piece)
    runs, run = [], []
    for k, (_, a, _) in enumerate(parts):  # runs of pieces with nothing between them
        if run and parts[run[-1]][2] != a:
            runs.append(run)
            run = []
        run.append(k)
    if run:
        runs.append(run)
    out = []
    for n, run in enumerate(runs):
        wordy = [k for k in run if any(c.isalnum() for c in parts[k][0])]
        word = (n, cleaned[parts[wordy[0]][1]:parts[wordy[-1]][2]]) if wordy else None
        for k in run:
            inside = bool(wordy) and wordy[0] <= k <= wordy[-1]
            out += [(i, word if inside else None) for i in per[k]]
    return out


def prompt_words(text: str, tokenizer, embeddings_dir: Dirs = None, width: int = 768) -> tuple:
    """(windows, words): the prompt's 77-token windows of (token, weight), exactly `prompt.prompt_windows`'s,
    and its typed words in prompt order (`Word`, positions into the concatenated windows)."""
    groups = []  # of ((token, word id), weight)
    texts = []  # word id -> text

    def new_word(t):
        texts.append(t)
        return len(texts) - 1

    for segment, weight in parse_weights(text):
        for piece in split_embeddings(segment):
            if piece.startswith(EMBEDDING_PREFIX) and embeddings_dir is not None:
                name_text = piece[len(EMBEDDING_PREFIX):].strip("\n")
                vectors, leftover = _embedding_piece(name_text, embeddings_dir, width)
                if vectors is not None:
                    name = name_text.split()[0].strip(",") if name_text.split() else ""
                    wid = new_word(EMBEDDING_PREFIX + name)
                    groups.append([((EmbeddingVector(name, v), wid), weight) for v in vectors])
                if leftover == "":
                    continue
                piece = leftover
            tagged, ids = [], {}
            for tok, word in _piece_words(tokenizer, piece):
                if word is not None and word[0] not in ids:
                    ids[word[0]] = new_word(word[1])
                tagged.append(((tok, None if word is None else ids[word[0]]), weight))
            groups.append(tagged)
    packed = pack_windows(groups, (tokenizer.bos_id, None), (tokenizer.eos_id, None),
                          (tokenizer.pad_id, None))
    windows, positions = [], [[] for _ in texts]
    for k, window in enumerate(packed):
        windows.append([(tok, w) for (tok, _), w in window])
        for p, ((_, wid), _) in enumerate(window):
            if wid is not None:
                positions[wid].append(k * len(window) + p)
    seen: dict = {}
    words = []
    for t, pos in zip(texts, positions):
        seen[t] = seen.get(t, 0) + 1
        words.append(Word(t, t if seen[t] == 1 else f"{t} ({seen[t]})", tuple(pos)))
    return windows, [w for w in words if w.positions]


def word_maps(token_maps: torch.Tensor, words: list, normalise: bool = True) -> torch.Tensor:
    """[B, T, H, W] token maps -> [B, len(words), H, W]: a word's map is the sum of its tokens' maps, scaled to
    0..1 by its maximum per picture when `normalise` (DAAM's normalisation)."""
    B, T, H, W = token_maps.shape
    out = torch.zeros(B, len(words), H, W)
    for i, w in enumerate(words):
        pos = [p for p in w.positions if p < T]
        if pos:
            out[:, i] = token_maps[:, pos].sum(dim=1)
    if normalise:
        top = out.flatten(2).amax(dim=2).clamp(min=1e-12)[..., None, None]  # (B, n, 1, 1)
        out = out / top
    return out


def recording_memory(latent_hw: tuple, tokens: int, levels: int, batch: int = 1) -> int:
    """Bytes of the running sums for a UNet whose cross-attention runs at the first `levels` feature sizes of a
    latent h x w (SD 1.x: 4 levels; glass-tiny: 1), T tokens, B pictures (float32)."""
    cells = sum(h * w for h, w in list(feature_sizes(*latent_hw).values())[:levels])
    return batch * tokens * cells * 4

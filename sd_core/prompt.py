"""Prompt syntax of ComfyUI's CLIPTextEncode: weights, escapes, textual-inversion embeddings, 77-token windows.

The rules (written down from ComfyUI's behaviour, re-implemented here):

Weights. `\\(` and `\\)` are literal brackets. Brackets are matched left to right; a top-level `( ... )`
group is weighted, everything else keeps the current weight. Inside a group the weight is
current * 1.1, unless the text after the group's LAST colon (at a position > 0) parses as a Python
float: then that number is the weight (it replaces, it does not multiply) and the colon part is removed.
Groups nest. Quirks kept on purpose, because they decide the tensor: an unclosed `(` is literal text; a
`)` with no open group makes the bracket depth negative, so every later bracket up to the point where
the depth returns to zero is literal text as well; `()` disappears; `(a:b)` keeps the text `a:b` at
weight 1.1 (we also log a warning); weights such as 0, -1, 1e2, inf are used as given.

Segments. Each weighted segment is tokenized on its own (so `a(b)c` is three words). A segment is cut
before every ` embedding:` / newline-`embedding:`; a piece starting with `embedding:NAME` becomes the
embedding's vectors (NAME ends at the first whitespace; trailing commas are retried without them) and
the rest of the piece is tokenized as text. Without an embeddings folder the piece is plain text.

Windows. Each piece's tokens form a group. Windows are [start, up to 75 tokens, end, pad...] of 77. A
group that does not fit in the current window: if it has fewer than 8 tokens the window is closed
(end token, padding) and the group starts the next one; longer groups fill the window and continue in
the next. So a plain prompt (one segment) is cut every 75 tokens, while short weighted pieces and
embeddings are not split.
"""
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

log = logging.getLogger(__name__)

WINDOW = 77  # tokens per CLIP window, start and end token included
MAX_WORD_LENGTH = 8  # groups shorter than this move whole to the next window instead of splitting
BRACKET_WEIGHT = 1.1
MAX_NESTING = 32  # bracket levels in a prompt (1.1 ** 32 = 21x); deeper is refused
EMBEDDING_PREFIX = "embedding:"
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
# placeholders for escaped brackets while groups are matched (the same characters ComfyUI uses, so text
# that happens to contain them behaves the same)
_ESC_CLOSE, _ESC_OPEN = "\0\1", "\0\2"

Dirs = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], None]


# ----------------------------------------------------------------------------- weights

def _top_level_groups(text: str) -> list:
    """Split into top-level pieces: '(...)' groups and the text between them (see the module rules)."""
    pieces, current, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    pieces.append(current)
                current = "("
            else:
                current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current + ")")
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def _weigh(text: str, weight: float, out: list) -> None:
    for piece in _top_level_groups(text):
        if len(piece) < 2 or piece[0] != "(" or piece[-1] != ")":
            out.append((piece, weight))
            continue
        inner, inner_weight = piece[1:-1], weight * BRACKET_WEIGHT
        colon = inner.rfind(":")
        if colon > 0:
            try:
                inner_weight = float(inner[colon + 1:])
                inner = inner[:colon]
                if not math.isfinite(inner_weight):
                    log.warning("prompt weight %r in %r is not finite; used as given",
                                inner_weight, _shown(piece))
            except ValueError:
                log.warning("malformed prompt weight %r in %r: not a number, so the text keeps the colon "
                            "and gets weight %.4g (the (text) rule), as ComfyUI does",
                            inner[colon + 1:], _shown(piece), inner_weight)
        elif colon == 0:
            log.warning("prompt group %r starts with ':' so it is not read as a weight; "
                        "the text keeps the colon and gets weight %.4g", _shown(piece), inner_weight)
        _weigh(inner, inner_weight, out)


def _shown(s: str) -> str:
    return s.replace(_ESC_CLOSE, "\\)").replace(_ESC_OPEN, "\\(")


def parse_weights(text: str) -> list:
    """[(segment, weight)] in prompt order; escaped brackets come back as literal '(' / ')'.

    >>> parse_weights("a (b:1.5) \\\\(c\\\\)")
    [('a ', 1.0), ('b', 1.5), (' (c)', 1.0)]
    """
    text = text.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)
    depth = deepest = 0
    for ch in text:  # the weighting walk recurses per bracket level: bound it with a clear error
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        raise ValueError(f"the prompt nests brackets {deepest} levels deep; at most {MAX_NESTING} "
                         f"(each level multiplies the weight by {BRACKET_WEIGHT})")
    out = []
    _weigh(text, 1.0, out)
    return [(s.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "("), w) for s, w in out]


def split_embeddings(segment: str) -> list:
    """Cut a segment before each ' embedding:' or '\\nembedding:' (the separator's space/newline is
    dropped); empty pieces are removed. Pieces after the first start with 'embedding:'."""
    parts = re.split(" " + EMBEDDING_PREFIX + "|\n" + EMBEDDING_PREFIX, segment)
    pieces = parts[:1] + [EMBEDDING_PREFIX + p for p in parts[1:]]
    return [p for p in pieces if p != ""]


# ----------------------------------------------------------------------------- textual inversion

@dataclass(frozen=True, eq=False)
class EmbeddingVector:
    """One vector of a textual-inversion embedding, standing in a window where a token would be."""
    name: str
    vector: torch.Tensor  # [D]


class EmbeddingError(ValueError):
    """An embedding file that cannot be read as a textual inversion."""


def _search_dirs(embeddings_dir: Dirs) -> list:
    if embeddings_dir is None:
        return []
    roots = [embeddings_dir] if isinstance(embeddings_dir, (str, os.PathLike)) else list(embeddings_dir)
    dirs = []
    for root in roots:  # the folder itself first, then its subfolders (sorted, links followed)
        for d, subdirs, _ in os.walk(root, followlinks=True):
            subdirs.sort()
            dirs.append(os.path.abspath(d))
    return dirs


def find_embedding(name: str, embeddings_dir: Dirs) -> Optional[Path]:
    """File for `embedding:name`: `name` as given, else name + .safetensors / .pt / .bin, in the
    embeddings folder and its subfolders. Names may contain a sub-path but never leave the folder."""
    for d in _search_dirs(embeddings_dir):
        path = os.path.abspath(os.path.join(d, name))
        try:
            if os.path.commonpath((d, path)) != d:
                continue
        except ValueError:
            continue
        for candidate in (path, *(path + ext for ext in EMBEDDING_EXTENSIONS)):
            if os.path.isfile(candidate):
                return Path(candidate)
    return None


def load_embedding(path: Union[str, os.PathLike], width: int = 768) -> torch.Tensor:
    """Vectors [N, D] of a textual inversion file. Layouts: AUTOMATIC1111 .pt (`string_to_param`),
    .safetensors with `emb_params` (AUTOMATIC1111) or `clip_l` (SD 1.x part of an SDXL-style file),
    LoRA-bundled `bundle_emb.*`, diffusers .bin (`{"<token>": [D]}`), or any file holding one tensor.
    `width` only picks tensors out of list-style files; a wrong width is reported when encoding.
    Raises EmbeddingError when the file cannot be read or holds no tensor."""
    path = Path(path)
    try:
        if path.name.lower().endswith(".safetensors"):
            from safetensors.torch import load_file
            data = load_file(str(path), device="cpu")
        else:  # pickles are opened tensor-only: nothing in the file is executed
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # any reader error means: not a usable embedding
        raise EmbeddingError(f"{path}: cannot be read as an embedding ({type(e).__name__}: {e})") from e

    out = None
    if isinstance(data, torch.Tensor):
        out = data
    elif isinstance(data, (list, tuple)):
        parts = [t.reshape(-1, t.shape[-1]) for item in data if isinstance(item, dict)
                 for t in item.values() if isinstance(t, torch.Tensor) and t.shape[-1] == width]
        out = torch.cat(parts) if parts else None
    elif isinstance(data, dict):
        if isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
            out = next(iter(data["string_to_param"].values()))
        else:
            for key in ("clip_l", "emb_params"):
                if isinstance(data.get(key), torch.Tensor):
                    out = data[key]
                    break
            if out is None:
                bundled = [v for k, v in data.items() if k.startswith("bundle_emb.")
                           and (".string_to_param." in k or k.endswith(".clip_l"))]
                if bundled:
                    out = torch.cat([b.reshape(-1, b.shape[-1]) for b in bundled])
            if out is None:
                tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
                out = tensors[0] if tensors else None
    if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.numel() == 0:
        raise EmbeddingError(f"{path}: no embedding tensor found (keys: {_keys(data)})")
    return out.detach().reshape(-1, out.shape[-1]).float()  # [N, D]


def _keys(data) -> str:
    return ", ".join(map(str, list(data)[:8])) if isinstance(data, dict) else type(data).__name__


def _lookup_embedding(name: str, embeddings_dir: Dirs, width: int) -> tuple:
    """(vectors or None, whether a file was found)."""
    path = find_embedding(name, embeddings_dir) if name else None
    if path is None:
        return None, False
    try:
        return load_embedding(path, width), True
    except EmbeddingError as e:
        log.warning("embedding:%s is left out: %s", name, e)
        return None, True


def _embedding_piece(text: str, embeddings_dir: Dirs, width: int) -> tuple:
    """(vectors [N, D] or None, leftover text) for the text after 'embedding:'."""
    words = text.split()
    if not words:
        log.warning("'embedding:' with no name is left out")
        return None, ""
    name, leftover = words[0], " ".join(words[1:])
    vectors, found = _lookup_embedding(name, embeddings_dir, width)
    if vectors is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):  # "embedding:foo," -> foo, and the comma is text
            vectors, found_stripped = _lookup_embedding(stripped, embeddings_dir, width)
            found = found or found_stripped
            # (ComfyUI's rule: the text kept is name[len(stripped):], which is the trailing commas)
            leftover = f"{name[len(stripped):]} {leftover}"
    if vectors is None and not found:
        log.warning("embedding:%s not found in %s; left out", name, embeddings_dir)
    return vectors, leftover


# ----------------------------------------------------------------------------- tokens and windows

def tokenize_prompt(text: str, tokenizer, embeddings_dir: Dirs = None, width: int = 768) -> list:
    """Groups of (token, weight): one group per tokenized piece or embedding, in prompt order.

    A token is an int id or an EmbeddingVector. `tokenizer` needs `.encode(text) -> list[int]`.
    """
    groups = []
    for segment, weight in parse_weights(text):
        for piece in split_embeddings(segment):
            if piece.startswith(EMBEDDING_PREFIX):
                if embeddings_dir is None:
                    log.warning("%r: no embeddings folder given, so it is encoded as plain text", piece[:40])
                else:
                    name_text = piece[len(EMBEDDING_PREFIX):].strip("\n")
                    vectors, leftover = _embedding_piece(name_text, embeddings_dir, width)
                    if vectors is not None:
                        name = name_text.split()[0].strip(",") if name_text.split() else ""
                        groups.append([(EmbeddingVector(name, v), weight) for v in vectors])
                    if leftover == "":
                        continue
                    piece = leftover
            groups.append([(t, weight) for t in tokenizer.encode(piece)])
    return groups


def pack_windows(groups: list, bos: int, eos: int, pad: Optional[int] = None, length: int = WINDOW) -> list:
    """Windows of exactly `length` (token, weight) pairs: start token, tokens, end token, padding."""
    pad = eos if pad is None else pad
    room = length - 1  # entries a window may hold before its end token (the start token included)
    window = [(bos, 1.0)]
    windows = [window]
    for group in groups:
        group = list(group)
        splittable = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(window) + len(group) <= room:
                window.extend(group)
                break
            free = room - len(window)
            if splittable:  # fill this window, the rest goes on in the next
                window.extend(group[:free])
                window.append((eos, 1.0))
                group = group[free:]
            else:  # close this window and move the whole group to the next
                window.append((eos, 1.0))
                window.extend([(pad, 1.0)] * free)
            window = [(bos, 1.0)]
            windows.append(window)
    window.append((eos, 1.0))
    window.extend([(pad, 1.0)] * (length - len(window)))
    return windows


def prompt_windows(text: str, tokenizer, embeddings_dir: Dirs = None, width: int = 768) -> list:
    """The prompt as 77-token windows of (token, weight): ComfyUI's tokenize_with_weights for SD 1.x."""
    groups = tokenize_prompt(text, tokenizer, embeddings_dir, width)
    return pack_windows(groups, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)

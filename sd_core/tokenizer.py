"""CLIP byte-level BPE tokenizer (the one SD 1.x prompts go through) and where to find its vocabulary.

Why the `tokenizers` library and not a hand-written BPE: it is a runtime dependency ComfyUI already ships,
it is fast (Rust), and running CLIP's split pattern through it gives the unicode classes Python's `re`
cannot express. The stages (all facts about CLIP's tokenizer, checked by tests/test_text_tokenizer.py):

1. clean-up, two flavours (`CLIPTokenizer(clean=...)`):
   - "comfyui" (default): what ComfyUI 0.8 does. ComfyUI 0.8 runs on transformers 4.x (it does not work
     with 5.x) and calls the SLOW `transformers.CLIPTokenizer`; ComfyUI does not ship `ftfy`, so that
     tokenizer cleans text with BERT's BasicTokenizer (strip_accents=False, no punctuation split):
     NUL, U+FFFD and every character of a "C*" category except tab / newline / carriage return are
     dropped (control and format characters: \x07, zero-width space, soft hyphen, ...); tab, newline,
     carriage return and "Zs" spaces become spaces; every CJK ideograph gets a space on each side (so
     each ideograph is its own word and ends in `</w>`); then NFC, split on whitespace, Python's
     `str.lower()`, joined with single spaces. Done in Python with `unicodedata` (`comfyui_clean`), not
     with `tokenizers.normalizers.BertNormalizer`: the Rust normalizer lower-cases without Python's
     final-sigma rule ("ΑΣ" -> "ασ", Python "ας"), keeps unassigned code points that Python drops,
     and its CJK ranges and Unicode tables differ from Python's (U+2B820..U+2B91F get no spaces, format
     characters newer than its tables are kept). Python's own tables are what the slow tokenizer uses,
     in the same interpreter.
     Typed special tokens follow the slow tokenizer too: `<|startoftext|>` / `<|endoftext|>` exactly as
     typed are the tokens; a spelling that becomes one only after clean-up (`<|ENDOFTEXT|>`) is the token
     where CLIP's split pattern yields it as one piece (after a space, letters or a digit; not after
     other punctuation: `!!<|ENDOFTEXT|>` stays text).
   - "transformers": transformers 5.x's fast CLIPTokenizer: NFC, every run of whitespace becomes one
     space, lower case (Rust); control characters are kept (as bytes) and CJK text is not spaced; only
     the exact special-token spellings are special.
   Other setups differ again: transformers 4.x with `ftfy` installed runs ftfy.fix_text (which also
   repairs mojibake). OpenAI's original tokenizer also unescapes HTML entities (`&amp;` -> `&`, twice)
   and strips the text; transformers does not, so by default neither do we. `html_unescape=True` adds
   OpenAI's entity clean-up before either flavour.
2. split: `<|startoftext|>`, `<|endoftext|>`, the contractions 's 't 're 've 'm 'll 'd, runs of letters,
   single digits, runs of anything else that is not whitespace; whitespace is dropped. (The slow
   tokenizer matches this case-insensitively; on lower-cased text that differs only for U+017F and
   U+0345: SPLIT_PATTERN_SLOW.)
3. each piece as UTF-8 bytes, each byte shown as one printable character (GPT-2's byte alphabet).
4. BPE merges, applied by rank; the last symbol of every piece carries the `</w>` word-end marker.
5. `<|startoftext|>` / `<|endoftext|>` typed in the text are the special tokens themselves (see 1).

Vocabulary files are third-party data: never committed and never downloaded. `find_vocabulary` looks for
them on this machine (see its docstring).
"""
import functools
import gzip
import html
import importlib.util
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Optional, Union

BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"
ENV_VAR = "GLASS_DIFFUSION_CLIP_VOCAB"
OPENAI_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's vocabulary uses the first 49408 - 256 - 256 - 2 merges of its (longer) BPE file
OPENAI_MERGE_COUNT = 49408 - 512 - 2

# CLIP's pre-tokenizer pattern (onig syntax, as the tokenizers library runs it)
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The slow tokenizer runs the same pattern case-insensitively (Python `regex`, IGNORECASE). On lower-cased
# text that changes two things: long s (U+017F) matches "s" (so "'\u017f" is one contraction piece), and
# U+0345 (combining ypogegrammeni, which case-folds to a letter) matches neither the letter runs nor the
# "anything else" runs, so it is dropped.
SPLIT_PATTERN_SLOW = (r"""<\|[s\x{17f}]tartoftext\|>|<\|endoftext\|>|'[s\x{17f}]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                      r"""[\p{N}]|[^\s\p{L}\p{N}\x{345}]+""")

PathLike = Union[str, os.PathLike]
CLEAN_MODES = ("comfyui", "transformers")

# CJK ideograph ranges that BERT's clean-up puts spaces around (unified ideographs and extensions A-F,
# compatibility ideographs and their supplement); kana, hangul and CJK punctuation are not in them
CJK_IDEOGRAPHS = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                  (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_SPECIAL_SPLIT = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


@functools.lru_cache(maxsize=8192)
def _clean_char(ch: str) -> str:
    """One character of ComfyUI's clean-up (before NFC and lower-casing): dropped, a space, spaced or kept."""
    if ch in "\t\n\r":
        return " "
    if ch == "\x00" or ch == "\ufffd":
        return ""
    cat = unicodedata.category(ch)
    if cat[0] == "C":  # control, format, surrogate, private use, unassigned
        return ""
    if cat == "Zs":
        return " "
    cp = ord(ch)
    if any(lo <= cp <= hi for lo, hi in CJK_IDEOGRAPHS):
        return f" {ch} "
    return ch


def comfyui_clean(text: str) -> str:
    """The clean-up ComfyUI 0.8 applies (slow transformers 4.x CLIPTokenizer without ftfy; module docstring)."""
    if text.isascii():  # fast path: only the ASCII controls and whitespace rules apply
        kept = text.translate(_ASCII_CLEAN)
    else:
        kept = "".join(_clean_char(ch) for ch in text)
    words = unicodedata.normalize("NFC", kept).split()
    return " ".join(w.lower() for w in words)


_ASCII_CLEAN = {cp: _clean_char(chr(cp)) for cp in range(128) if _clean_char(chr(cp)) != chr(cp)}


class VocabularyNotFoundError(FileNotFoundError):
    """No CLIP vocabulary was found; the message lists every place that was searched and how to fix it."""


def byte_table() -> dict:
    """{byte: printable character} of GPT-2's byte-level mapping, in CLIP vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves and come first; the other 68 bytes
    get the code points 256, 257, ... in byte order and come after them.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def byte_alphabet() -> list:
    """The 256 characters standing for bytes, in vocabulary order (ids 0..255)."""
    return list(byte_table().values())


def vocab_from_merges(merges: list) -> dict:
    """OpenAI's construction of the id table: bytes, bytes + '</w>', one token per merge, then the two specials."""
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS_TEXT, EOS_TEXT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("BPE merges produce a token twice; this is not a CLIP merges file")
    return vocab


def _parse_merge_lines(lines: list, source: Path) -> list:
    merges = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}: line {n + 1} is not a BPE merge ('left right'): {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def read_vocabulary(path: PathLike) -> tuple:
    """(vocab {token: id}, merges [(left, right)]) from one of the layouts CLIP vocabularies come in:

    - a folder holding Hugging Face's `vocab.json` + `merges.txt` (diffusers `tokenizer/`, ComfyUI's
      `comfy/sd1_tokenizer/`);
    - a `merges.txt` file with `vocab.json` beside it;
    - OpenAI's `bpe_simple_vocab_16e6.txt.gz` (or the same text un-gzipped): a version line then merges;
      the ids follow from the merges (`vocab_from_merges`).
    """
    path = Path(path)
    if path.is_dir():
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    elif path.name.endswith(".json"):
        vocab_file, merges_file = path, path.with_name("merges.txt")
    elif path.suffix == ".txt" and (path.parent / "vocab.json").is_file():
        vocab_file, merges_file = path.parent / "vocab.json", path
    else:
        vocab_file, merges_file = None, path
    opener = gzip.open if merges_file.name.endswith(".gz") else open
    with opener(merges_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # the first line is a version header in both formats ("#version: 0.2", '"bpe_simple_vocab_16e6.txt#version: 0.2')
    body = lines[1:] if lines and "#version" in lines[0] else lines
    if vocab_file is None:
        merges = _parse_merge_lines(body[:OPENAI_MERGE_COUNT], merges_file)
        return vocab_from_merges(merges), merges
    merges = _parse_merge_lines(body, merges_file)
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    return vocab, merges


def _is_vocabulary(path: Path) -> bool:
    if path.is_dir():
        return (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    return path.is_file()


def _package_dir(name: str) -> Optional[Path]:
    """Folder of an installed top-level package, found WITHOUT importing it (open_clip imports torchvision)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_vocabulary(explicit: Optional[PathLike] = None, model_dir: Optional[PathLike] = None) -> Path:
    """Path of a CLIP vocabulary (a folder with vocab.json + merges.txt, or an OpenAI .txt.gz BPE file).

    Looks, in order, at:
    1. `explicit` (argument), then the environment variable GLASS_DIFFUSION_CLIP_VOCAB: either layout;
    2. `<model_dir>/tokenizer/` beside a diffusers-layout model;
    3. ComfyUI's bundled `comfy/sd1_tokenizer/` when a `comfy` package is importable (inside ComfyUI);
    4. the BPE file carried by OpenAI-CLIP-style packages (`open_clip`, OpenAI's `clip`), located
       without importing them.
    An explicit path (argument or variable) that does not exist is an error, not a reason to look further.
    Raises VocabularyNotFoundError listing every place searched and how to provide a vocabulary.
    """
    looked = []
    for origin, value in (("argument", explicit), (f"environment variable {ENV_VAR}", os.environ.get(ENV_VAR))):
        if value:
            p = Path(value).expanduser()
            if _is_vocabulary(p):
                return p
            raise VocabularyNotFoundError(
                f"CLIP vocabulary given by {origin} not found or incomplete: {p} (expected a folder with "
                f"vocab.json + merges.txt, a merges.txt with vocab.json beside it, or {OPENAI_BPE_NAME})")
    looked.append(f"argument / ${ENV_VAR}: not set")
    candidates = []
    if model_dir is not None:
        candidates.append(("diffusers model tokenizer folder", Path(model_dir) / "tokenizer"))
    else:
        looked.append("diffusers model tokenizer folder: no model folder given")
    comfy = _package_dir("comfy")
    if comfy is not None:
        candidates.append(("ComfyUI bundled tokenizer", comfy / "sd1_tokenizer"))
    else:
        looked.append("ComfyUI bundled tokenizer: package 'comfy' not importable")
    for pkg in ("open_clip", "clip"):
        d = _package_dir(pkg)
        if d is not None:
            candidates.append((f"{pkg} package BPE file", d / OPENAI_BPE_NAME))
        else:
            looked.append(f"{pkg} package BPE file: package '{pkg}' not installed")
    for what, p in candidates:
        if _is_vocabulary(p):
            return p
        looked.append(f"{what}: {p} (missing)")
    raise VocabularyNotFoundError(
        "CLIP tokenizer vocabulary not found. Looked at:\n  - " + "\n  - ".join(looked) +
        f"\nFix one of: pass the path of a tokenizer folder (vocab.json + merges.txt) or of {OPENAI_BPE_NAME}; "
        f"set {ENV_VAR} to it; keep the tokenizer/ folder beside a diffusers model; run inside ComfyUI; "
        "or `pip install --no-deps open-clip-torch`, which carries the file.")


class CLIPTokenizer:
    """Text -> CLIP token ids (no start/end tokens added; prompt packing adds them per window).

    `vocab`: a path accepted by `read_vocabulary`, or None to search with `find_vocabulary(model_dir=...)`.
    `clean`: "comfyui" (ComfyUI 0.8 = slow transformers 4.x tokenizer without ftfy) or "transformers"
    (transformers 5.x fast tokenizer); see the module docstring. `html_unescape`: OpenAI's entity clean-up.
    `pad_id`: the padding id of the model family's text recipe (`TextRecipe.pad_id`); None pads with the end
    token, as CLIP ViT-L / SD 1.x (SD 2.x's OpenCLIP pads with 0).
    """

    def __init__(self, vocab: Optional[PathLike] = None, *, model_dir: Optional[PathLike] = None,
                 clean: str = "comfyui", html_unescape: bool = False, pad_id: Optional[int] = None):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        self.path = find_vocabulary(vocab, model_dir)
        self.vocab, merges = read_vocabulary(self.path)
        for special in (BOS_TEXT, EOS_TEXT):
            if special not in self.vocab:
                raise ValueError(f"{self.path}: vocabulary has no {special} token")
        if clean not in CLEAN_MODES:
            raise ValueError(f"clean must be one of {CLEAN_MODES}, not {clean!r}")
        self.clean_mode = clean
        self.html_unescape = html_unescape
        tok = Tokenizer(BPE(vocab=self.vocab, merges=merges, end_of_word_suffix="</w>",
                            continuing_subword_prefix="", unk_token=EOS_TEXT, fuse_unk=False))
        if clean == "transformers":  # "comfyui" cleans in Python before the pipeline (comfyui_clean)
            tok.normalizer = normalizers.Sequence([
                normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        pattern = SPLIT_PATTERN if clean == "transformers" else SPLIT_PATTERN_SLOW
        self._split = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
        # bytes -> printable alphabet. transformers 5.x's ByteLevel step also re-splits each piece with GPT-2's
        # pattern (a no-op on SPLIT_PATTERN's pieces); the slow tokenizer does not, which matters for
        # SPLIT_PATTERN_SLOW's "'\u017f" and "<|\u017ftartoftext|>" pieces
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=clean == "transformers")
        tok.pre_tokenizer = pre_tokenizers.Sequence([self._split, byte_level])
        # special tokens typed in the prompt are matched as typed, before clean-up ("comfyui" splits them off
        # in Python first, then also takes split pieces that spell them after clean-up: `_encode_cleaned`)
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS_TEXT, EOS_TEXT)])
        self._tok = tok
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self.bos_id = self.vocab[BOS_TEXT]
        self.eos_id = self.vocab[EOS_TEXT]
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self._special_ids = {BOS_TEXT: self.bos_id, EOS_TEXT: self.eos_id}
        self.vocab_size = len(self.vocab)

    def encode(self, text: str) -> list:
        """Token ids of `text`, without start or end token."""
        if self.html_unescape:  # OpenAI CLIP's clean-up: entities unescaped twice, then stripped
            text = html.unescape(html.unescape(text)).strip()
        if self.clean_mode == "transformers":
            return self._tok.encode(text, add_special_tokens=False).ids
        ids = []
        for chunk in _SPECIAL_SPLIT.split(text):  # special tokens as typed split the text first
            if chunk in self._special_ids:
                ids.append(self._special_ids[chunk])
            elif chunk:
                ids += self._encode_cleaned(comfyui_clean(chunk))
        return ids

    def _encode_cleaned(self, text: str) -> list:
        """Ids of text already through `comfyui_clean`: a split piece spelling a special token is that token."""
        if BOS_TEXT not in text and EOS_TEXT not in text:
            return self._tok.encode(text, add_special_tokens=False).ids
        ids, run = [], []
        for piece in [p for p, _ in self._split.pre_tokenize_str(text)] + [None]:
            if piece is None or piece in self._special_ids:
                if run:  # pieces never hold whitespace, so space-joined pieces split back into themselves
                    ids += self._tok.encode(" ".join(run), add_special_tokens=False).ids
                    run = []
                if piece is not None:
                    ids.append(self._special_ids[piece])
            else:
                run.append(piece)
        return ids

    def clean(self, text: str) -> str:
        """`text` after this tokenizer's clean-up (HTML unescaping included when enabled), for inspection."""
        if self.html_unescape:
            text = html.unescape(html.unescape(text)).strip()
        if self.clean_mode == "transformers":
            return self._tok.normalizer.normalize_str(text)
        return "".join(c if c in self._special_ids else comfyui_clean(c) for c in _SPECIAL_SPLIT.split(text))

    def unknown_words(self, text: str) -> list:
        """The words of `text` (runs of letters, after clean-up) that are not one whole token of this vocabulary,
        in order, each once. A small vocabulary (the built-in model's) knows such a word only by its pieces."""
        pieces = [p for p, _ in self._split.pre_tokenize_str(self.clean(text))]
        return [p for p in dict.fromkeys(pieces) if p.isalpha() and p + "</w>" not in self.vocab]

    def pieces(self, text: str) -> list:
        """The pre-tokenizer's pieces of `text` after clean-up, as (piece, start, end) offsets into `self.clean(text)`:
        each piece is BPE-encoded on its own, so the ids of `text` are the ids of its pieces in order."""
        return [(p, a, b) for p, (a, b) in self._split.pre_tokenize_str(self.clean(text))]

    def tokens(self, text: str) -> list:
        """The BPE token strings of `text` (for inspection and error messages)."""
        return [self._id_to_token[i] for i in self.encode(text)]

    def decode(self, ids: list) -> str:
        """Readable text for ids (word ends become spaces; special tokens kept)."""
        to_byte = {c: b for b, c in byte_table().items()}
        out = bytearray()
        for i in ids:
            t = self._id_to_token[int(i)]
            if t in (BOS_TEXT, EOS_TEXT):
                out += t.encode() + b" "
                continue
            end = t.endswith("</w>")
            out += bytes(to_byte[c] for c in (t[:-4] if end else t))
            if end:
                out += b" "
        return out.decode("utf-8", errors="replace").strip()

    def __repr__(self) -> str:
        return f"CLIPTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, clean={self.clean_mode!r})"

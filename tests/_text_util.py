"""Helpers for the text tests: the prompt corpus, the tests' own small BPE vocabulary, reference tokenizers.

The small vocabulary (tests/data/text_small_bpe.txt, OpenAI's merges-file layout) was learned from the
prompt corpus by `make_small_vocab()`; rerun it with `python tests/_text_util.py` to regenerate.
The real CLIP vocabulary is never stored here; `real_vocab_path()` finds the copy that open-clip-torch
carries (installed --no-deps by .ci/run) without importing open_clip.
"""
import importlib.util
import json
import re
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"
CORPUS_FILE = DATA / "text_prompts.json"
SMALL_BPE = DATA / "text_small_bpe.txt"
SMALL_MERGES = 600


def load_corpus() -> list:
    return json.loads(CORPUS_FILE.read_text(encoding="utf-8"))


def real_vocab_path():
    """Path of open_clip's bpe_simple_vocab_16e6.txt.gz, or None (the package is not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return p if p.is_file() else None


REAL_VOCAB_MISSING = ("the real CLIP vocabulary is absent: `pip install --no-deps open-clip-torch` provides "
                      "open_clip/bpe_simple_vocab_16e6.txt.gz (.ci/run installs it)")


def write_hf_folder(vocab_source, folder: Path) -> Path:
    """Write Hugging Face's vocab.json + merges.txt for a vocabulary (any layout read_vocabulary accepts)."""
    from glass_diffusion.sd_core.tokenizer import read_vocabulary

    vocab, merges = read_vocabulary(vocab_source)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def hf_tokenizer(folder: Path):
    """transformers' CLIPTokenizer loaded from a vocab.json + merges.txt folder, as ComfyUI loads it.

    (transformers 5.x: `CLIPTokenizer(vocab_file=..., merges_file=...)` silently ignores those keywords,
    so the folder form is used.)
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def hf_ids(hf, text: str) -> list:
    """Reference ids without the start / end tokens transformers adds."""
    ids = hf(text)["input_ids"]
    assert ids[0] == hf.bos_token_id and ids[-1] == hf.eos_token_id
    return ids[1:-1]


def basic_tokenizer():
    """transformers' BERT BasicTokenizer as transformers 4.x's slow CLIPTokenizer builds it when `ftfy` is
    missing (ComfyUI 0.8's case): accents kept, no punctuation split; lower case and CJK spacing on (the
    defaults). transformers 5.x still has it, in tokenization_bert_legacy."""
    from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer

    return BasicTokenizer(strip_accents=False, do_split_on_punc=False)


def comfyui_reference_ids(hf, basic, text: str) -> list:
    """Ids ComfyUI 0.8 gets from transformers 4.x's slow CLIPTokenizer without ftfy, rebuilt from
    transformers 5.x parts: the slow tokenizer first splits the text at the special tokens as typed, cleans
    each other part with `" ".join(basic.tokenize(part))`, then runs CLIP's split pattern and BPE on it,
    which is what `hf` (the fast tokenizer) does to that cleaned text. Corners not rebuilt (pinned with
    measured ids in test_text_tokenizer.py instead, so the corpus avoids them): a special token spelled only
    after clean-up (`<|ENDOFTEXT|>`) right after other punctuation, which the fast tokenizer takes as the
    token and the slow one does not; and the slow tokenizer's case-insensitive split ("'\u017f", U+0345)."""
    parts = re.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text)
    cleaned = [p if p in ("<|startoftext|>", "<|endoftext|>") else " ".join(basic.tokenize(p)) for p in parts]
    return hf_ids(hf, " ".join(cleaned))


def make_small_vocab(n_merges: int = SMALL_MERGES) -> None:
    """Learn `n_merges` CLIP-style BPE merges (with </w> word ends) from the corpus; write SMALL_BPE."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from glass_diffusion.sd_core.tokenizer import SPLIT_PATTERN

    tok = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    # (the vocabulary was learned with transformers 5.x's clean-up, before the default became ComfyUI's)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=10 ** 6, limit_alphabet=10 ** 6, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(load_corpus(), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"][:n_merges]
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
    lines = ["#version: 0.2 (glass-diffusion test vocabulary, learned from text_prompts.json)"]
    lines += [f"{a} {b}" for a, b in merges]
    SMALL_BPE.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    make_small_vocab()
    print("wrote", SMALL_BPE)

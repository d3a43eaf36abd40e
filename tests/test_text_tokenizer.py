"""CLIP tokenizer: ids equal transformers' CLIPTokenizer on the prompt corpus; vocabulary search order."""
import gzip
import json
import shutil

import pytest

from _text_util import (REAL_VOCAB_MISSING, SMALL_BPE, hf_ids, hf_tokenizer, load_corpus, real_vocab_path,
                        write_hf_folder)
from glass_diffusion.sd_core import tokenizer as T
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer, VocabularyNotFoundError, find_vocabulary

REAL = real_vocab_path()
needs_real = pytest.mark.skipif(REAL is None, reason=REAL_VOCAB_MISSING)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_corpus_covers_the_hard_cases(corpus):
    small = CLIPTokenizer(SMALL_BPE)
    assert len(corpus) >= 200
    joined = "".join(corpus)
    for needle in ["é", "🐱", "日本", "!!!", "1234", "don't", "  ", "\n", "&amp;", "PHOTO", "<|endoftext|>"]:
        assert needle in joined, needle
    assert sum(len(small.encode(p)) >= 300 for p in corpus) >= 5  # long prompts (300+ tokens)


def _parity(vocab_source, corpus, tmp_path):
    ours = CLIPTokenizer(vocab_source)
    ref = hf_tokenizer(write_hf_folder(vocab_source, tmp_path / "hf"))
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (ref.bos_token_id, ref.eos_token_id, len(ref))
    bad = [p for p in corpus if ours.encode(p) != hf_ids(ref, p)]
    assert not bad, f"{len(bad)} of {len(corpus)} prompts differ, first: {bad[0]!r}"
    return ours


def test_small_vocabulary_matches_transformers(corpus, tmp_path):
    ours = _parity(SMALL_BPE, corpus, tmp_path)
    assert ours.vocab_size == 512 + 600 + 2
    # the small vocabulary really merges: a common word is one token with its word end
    assert ours.tokens("photo") == ["photo</w>"]


@needs_real
def test_real_vocabulary_matches_transformers(corpus, tmp_path):
    ours = _parity(REAL, corpus, tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (49406, 49407, 49408)
    # pinned ids (CLIP ViT-L/14 vocabulary)
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert ours.encode("A  PHOTO\n\nof a CAT") == [320, 1125, 539, 320, 2368]
    assert ours.encode("") == [] and ours.encode(" \n\t ") == []


def test_cleanup_rules():
    tok = CLIPTokenizer(SMALL_BPE)
    assert tok.encode("A  Photo\n\tOF") == tok.encode("a photo of")  # whitespace runs and case
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")  # NFC
    assert tok.encode("<|endoftext|>") == [tok.eos_id]  # typed special tokens are the tokens
    assert tok.encode("a<|startoftext|>b") == tok.encode("a") + [tok.bos_id] + tok.encode("b")
    assert tok.eos_id not in tok.encode("<|ENDOFTEXT|>")  # matched as typed, before lower-casing
    assert tok.encode("1234") == [tok.vocab[c + "</w>"] for c in "1234"]  # digits one by one
    assert tok.encode("&amp;") != tok.encode("&")  # transformers keeps entities ...
    html_tok = CLIPTokenizer(SMALL_BPE, html_unescape=True)  # ... OpenAI's clean-up unescapes them
    assert html_tok.encode(" &amp;amp; &lt;b&gt; ") == tok.encode("& <b>")
    assert tok.decode(tok.encode("A photo of ça, 🐱!")) == "a photo of ça , 🐱!"  # emoji + "!" is one non-letter run


def test_vocabulary_layouts_agree(tmp_path):
    """OpenAI .txt.gz, HF folder, merges.txt with vocab.json beside: the same ids."""
    gz = tmp_path / "bpe_small.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(SMALL_BPE.read_text(encoding="utf-8"))
    folder = write_hf_folder(SMALL_BPE, tmp_path / "hf")
    text = "a photo of a cat, café 🐱 don't 123"
    ids = CLIPTokenizer(SMALL_BPE).encode(text)
    assert CLIPTokenizer(gz).encode(text) == ids
    assert CLIPTokenizer(folder).encode(text) == ids
    assert CLIPTokenizer(folder / "merges.txt").encode(text) == ids
    assert CLIPTokenizer(folder / "vocab.json").encode(text) == ids
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == len(vocab) - 1


@pytest.fixture
def no_packages(monkeypatch):
    """Pretend no comfy / open_clip / clip package is installed; returns the dict to add fake ones to."""
    fake = {}
    monkeypatch.setattr(T, "_package_dir", lambda name: fake.get(name))
    monkeypatch.delenv(T.ENV_VAR, raising=False)
    return fake


def test_vocabulary_search_order(tmp_path, monkeypatch, no_packages):
    def hf_dir(name):
        return write_hf_folder(SMALL_BPE, tmp_path / name)

    explicit, env, model = hf_dir("explicit"), hf_dir("env"), tmp_path / "model"
    hf_dir("model/tokenizer")
    comfy = tmp_path / "comfy"
    hf_dir("comfy/sd1_tokenizer")
    open_clip = tmp_path / "open_clip"
    open_clip.mkdir()
    shutil.copy(SMALL_BPE, open_clip / "bpe_simple_vocab_16e6.txt.gz")  # any name-matching file counts
    no_packages.update(comfy=comfy, open_clip=open_clip)
    monkeypatch.setenv(T.ENV_VAR, str(env))

    assert find_vocabulary(explicit, model) == explicit
    assert find_vocabulary(None, model) == env
    monkeypatch.delenv(T.ENV_VAR)
    assert find_vocabulary(None, model) == model / "tokenizer"
    assert find_vocabulary(None, tmp_path / "no-such-model") == comfy / "sd1_tokenizer"
    del no_packages["comfy"]
    assert find_vocabulary() == open_clip / "bpe_simple_vocab_16e6.txt.gz"
    assert CLIPTokenizer(model_dir=model).path == model / "tokenizer"


def test_missing_vocabulary_says_where_it_looked(tmp_path, no_packages):
    with pytest.raises(VocabularyNotFoundError) as e:
        find_vocabulary(None, tmp_path / "model")
    msg = str(e.value)
    for part in ["GLASS_DIFFUSION_CLIP_VOCAB", str(tmp_path / "model" / "tokenizer"), "comfy", "open_clip",
                 "pip install --no-deps open-clip-torch"]:
        assert part in msg, part
    with pytest.raises(VocabularyNotFoundError, match="not found or incomplete: .*nowhere"):
        CLIPTokenizer(tmp_path / "nowhere")
    half = tmp_path / "half"
    half.mkdir()
    (half / "vocab.json").write_text("{}")
    with pytest.raises(VocabularyNotFoundError, match="half"):
        find_vocabulary(half)


@needs_real
def test_open_clip_file_found_without_importing_it(monkeypatch):
    import sys
    monkeypatch.delenv(T.ENV_VAR, raising=False)
    assert find_vocabulary(None, None).name.endswith(".txt.gz") or "comfy" in sys.modules
    assert "open_clip" not in sys.modules

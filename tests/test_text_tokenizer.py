"""CLIP tokenizer: ids equal transformers' tokenizers on the prompt corpus (ComfyUI 0.8's slow-tokenizer
clean-up by default, transformers 5.x's fast one on request); vocabulary search order."""
import gzip
import json
import shutil

import pytest

from _text_util import (REAL_VOCAB_MISSING, SMALL_BPE, basic_tokenizer, comfyui_reference_ids, hf_ids,
                        hf_tokenizer, load_corpus, real_vocab_path, write_hf_folder)
from glass_diffusion.sd_core import tokenizer as T
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer, VocabularyNotFoundError, comfyui_clean, find_vocabulary

REAL = real_vocab_path()
needs_real = pytest.mark.skipif(REAL is None, reason=REAL_VOCAB_MISSING)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def basic():
    return basic_tokenizer()


def test_corpus_covers_the_hard_cases(corpus):
    small = CLIPTokenizer(SMALL_BPE)
    assert len(corpus) >= 200
    joined = "".join(corpus)
    for needle in ["é", "🐱", "日本", "!!!", "1234", "don't", "  ", "\n", "&amp;", "PHOTO", "<|endoftext|>",
                   "東京", "ネオン", "ひらがな", "\x00", "\x07", "\u200b", "\u00ad", "\ufeff", "\ufffd", "ΣΟΦΟΣ",
                   "<|ENDOFTEXT|>", "\U00020000"]:
        assert needle in joined, repr(needle)
    assert sum(len(small.encode(p)) >= 300 for p in corpus) >= 5  # long prompts (300+ tokens)


def _parity(vocab_source, corpus, tmp_path, basic):
    """Default clean-up == ComfyUI 0.8's (BasicTokenizer + CLIP split/BPE); clean="transformers" ==
    transformers' fast CLIPTokenizer; and the corpus tells the two apart."""
    ours = CLIPTokenizer(vocab_source)
    fast = CLIPTokenizer(vocab_source, clean="transformers")
    ref = hf_tokenizer(write_hf_folder(vocab_source, tmp_path / "hf"))
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (ref.bos_token_id, ref.eos_token_id, len(ref))
    assert ours.clean_mode == "comfyui" and fast.clean_mode == "transformers"
    bad = [p for p in corpus if ours.encode(p) != comfyui_reference_ids(ref, basic, p)]
    assert not bad, f"comfyui: {len(bad)} of {len(corpus)} prompts differ, first: {bad[0]!r}"
    bad = [p for p in corpus if fast.encode(p) != hf_ids(ref, p)]
    assert not bad, f"transformers: {len(bad)} of {len(corpus)} prompts differ, first: {bad[0]!r}"
    differ = [p for p in corpus if ours.encode(p) != fast.encode(p)]
    for needle in ["東京の夜景", "漂亮的山水画", "bell\x07ring", "ΣΟΦΟΣ"]:  # CJK, controls, final sigma
        assert any(needle in p for p in differ), needle
    return ours


def test_small_vocabulary_matches_transformers(corpus, tmp_path, basic):
    ours = _parity(SMALL_BPE, corpus, tmp_path, basic)
    assert ours.vocab_size == 512 + 600 + 2
    # the small vocabulary really merges: a common word is one token with its word end
    assert ours.tokens("photo") == ["photo</w>"]


@needs_real
def test_real_vocabulary_matches_transformers(corpus, tmp_path, basic):
    ours = _parity(REAL, corpus, tmp_path, basic)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (49406, 49407, 49408)
    # pinned ids (CLIP ViT-L/14 vocabulary)
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert ours.encode("A  PHOTO\n\nof a CAT") == [320, 1125, 539, 320, 2368]
    assert ours.encode("") == [] and ours.encode(" \n\t ") == []


# Measured, not derived: window contents (no start / end / padding) that ComfyUI 0.8.0 (transformers 4.57,
# slow CLIPTokenizer, no ftfy) produced with its bundled sd1_tokenizer vocabulary, measured by the project;
# the other entries are transformers 4.57.1's slow CLIPTokenizer without ftfy on the same vocabulary.
COMFYUI_08_IDS = {
    "東京の夜景、ネオン": [27667, 365, 21078, 361, 4813, 362, 23170, 506, 48132, 363, 45262, 2429, 235, 3909, 103,
                       26875],
    "漂亮的山水画": [162, 120, 480, 21078, 362, 163, 248, 482, 46096, 365, 162, 108, 368, 20211, 375],
}
SLOW_457_IDS = {
    # corner: a special token spelled after clean-up, right after other punctuation, stays text
    "!!<|ENDOFTEXT|> a<|ENDOFTEXT|>b 7<|STARTOFTEXT|>": [1443, 27, 347, 40786, 4160, 91, 285, 320, 49407, 321, 278,
                                                         49406],
    "ΟΔΥΣΣΕΑΣ ΣΟΦΟΣ, ΑΣ": [138, 123, 138, 112, 139, 227, 139, 225, 139, 225, 138, 113, 138, 109, 139, 480, 139, 225,
                          138, 123, 139, 228, 138, 123, 139, 480, 267, 138, 109, 139, 480],  # final sigma
    "soft\u00adhyphen bell\x07ring zero\u200bwidth nul\x00byte bad\ufffdbyte": [
        1571, 7804, 745, 576, 5417, 2540, 14867, 23571, 29358, 42798, 2564, 42798],
    "ext-b \U00020000 ext-e \U0002b820 compat \uf900": [20072, 268, 321, 172, 254, 222, 478, 20072, 268, 324, 172,
                                                     104, 254, 510, 2561, 536, 164, 109, 486],
    # the slow tokenizer's split pattern is case-insensitive: "'\u017f" is a contraction piece, U+0345 is dropped
    "it'\u017f \u017ftrasse <|\u017ftartoftext|> a\u0345b \u03b1\u0345": [
        585, 6, 129, 379, 129, 123, 752, 8938, 27, 91, 129, 123, 2002, 6659, 18169, 91, 285, 320, 321, 157, 122, 367],
    "cat猫dog 3D东方 カタカナ 한국어漢字": [2368, 163, 234, 360, 1929, 274, 323, 19759, 506, 29032, 373, 37367, 34941,
                                   37367, 2429, 488, 15197, 250, 31871, 255, 31625, 368, 162, 120, 351, 35751, 501],
}


@needs_real
def test_real_vocabulary_matches_comfyui_measurements():
    tok = CLIPTokenizer(REAL)
    for text, ids in {**COMFYUI_08_IDS, **SLOW_457_IDS}.items():
        assert tok.encode(text) == ids, text
    fast = CLIPTokenizer(REAL, clean="transformers")
    assert all(fast.encode(text) != ids for text, ids in COMFYUI_08_IDS.items())  # the bug this pins


def _probe_characters():
    """Every BMP code point (surrogates aside), the supplementary CJK ideograph blocks' edges, and a
    stride through the other planes."""
    cps = [cp for cp in range(0x10000) if not 0xD800 <= cp < 0xE000]
    for lo, hi in T.CJK_IDEOGRAPHS:
        cps += [lo - 1, lo, hi, hi + 1]
    cps += range(0x10000, 0x110000, 97)
    return [chr(cp) for cp in cps if not 0xD800 <= cp < 0xE000]


def test_comfyui_clean_equals_basic_tokenizer_on_every_character(basic):
    """Each character between cased letters, after a sigma (final-sigma rule) and after a combining
    sequence (NFC): our clean-up == transformers' BasicTokenizer, joined as the slow tokenizer joins it."""
    bad = []
    for c in _probe_characters():
        text = f"A{c}B \u03a3{c} e\u0301{c}\u0301 {c}"
        if comfyui_clean(text) != " ".join(basic.tokenize(text)):
            bad.append(hex(ord(c)))
    assert not bad, f"{len(bad)} characters differ: {bad[:20]}"


def test_cleanup_rules():
    tok = CLIPTokenizer(SMALL_BPE)
    fast = CLIPTokenizer(SMALL_BPE, clean="transformers")
    for t in (tok, fast):
        assert t.encode("A  Photo\n\tOF") == t.encode("a photo of")  # whitespace runs and case
        assert t.encode("cafe\u0301") == t.encode("caf\u00e9")  # NFC
        assert t.encode("<|endoftext|>") == [t.eos_id]  # typed special tokens are the tokens
        assert t.encode("a<|startoftext|>b") == t.encode("a") + [t.bos_id] + t.encode("b")
    # ComfyUI's clean-up drops control / format characters, spaces CJK ideographs, lower-cases as Python
    assert tok.encode("a\x07b\u200bc\u00add\x00e\ufffdf") == tok.encode("abcdef") != fast.encode("a\x07b\u200bc")
    assert tok.encode("猫犬") == tok.encode("猫 犬") != fast.encode("猫犬")
    assert tok.clean("Cat猫DOG\tΣΟΦΟΣ") == "cat 猫 dog σοφος"
    assert fast.clean("Cat猫DOG\tΣΟΦΟΣ") == "cat猫dog σοφοσ"
    assert tok.encode("ΑΣ") == tok.encode("ας") != tok.encode("ασ") == fast.encode("ΑΣ")
    # a special token spelled after clean-up is the token where CLIP's split yields it as one piece
    assert tok.encode("<|ENDOFTEXT|>") == [tok.eos_id] and tok.encode("x<|endof\u200btext|>") == [
        *tok.encode("x"), tok.eos_id]
    assert tok.eos_id not in tok.encode("!!<|ENDOFTEXT|>")  # "!!<|" is one piece there
    assert fast.eos_id not in fast.encode("<|ENDOFTEXT|>")  # transformers 5.x: matched as typed only
    with pytest.raises(ValueError, match="clean must be one of"):
        CLIPTokenizer(SMALL_BPE, clean="ftfy")
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

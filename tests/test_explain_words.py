"""Prompt tokens mapped back to the words the user typed (sd_core.attention_maps.prompt_words): the windows are
exactly the prompt parser's, and weights, embeddings, several windows and multi-token words land on their word."""
import pytest
import torch
from safetensors.torch import save_file

from glass_diffusion.sd_core import builtin
from glass_diffusion.sd_core.attention_maps import prompt_words, word_maps
from glass_diffusion.sd_core.prompt import WINDOW, prompt_windows
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer(builtin.VOCABULARY)


def _tokens_of(tok, windows, word):
    flat = [t for w in windows for t, _ in w]
    return [flat[p] for p in word.positions]


@pytest.mark.parametrize("prompt", [
    "a red circle in the center on a blue background",
    "a (red:1.3) ((circle)) on a [blue] background, lighthouse",
    "\\(literal\\) top-left, red-ish; 2024 circles",
    "a " * 80 + "large green square",
    "",
])
def test_windows_are_the_parsers(tok, prompt):
    windows, words = prompt_words(prompt, tok, width=32)
    assert windows == prompt_windows(prompt, tok, width=32)
    flat = [t for w in windows for t, _ in w]
    for w in words:  # every word's tokens are exactly the tokens of its text
        assert _tokens_of(tok, windows, w) == tok.encode(w.text), w
        assert all(flat[p] not in (tok.bos_id, tok.eos_id) for p in w.positions)


def test_weights_and_multi_token_words(tok):
    _, words = prompt_words("a (red:1.3) lighthouse, at the top-left (circle) red", tok, width=32)
    assert [w.label for w in words] == ["a", "red", "lighthouse", "at", "the", "top-left", "circle", "red (2)"]
    lighthouse = words[2]
    assert len(lighthouse.positions) == len(tok.encode("lighthouse")) > 1  # pieces merged into one word
    assert lighthouse.positions == tuple(range(lighthouse.positions[0], lighthouse.positions[0] + len(lighthouse.positions)))


def test_several_windows(tok):
    prompt = " ".join(["red"] * 100) + " circle"
    windows, words = prompt_words(prompt, tok, width=32)
    assert len(windows) == 2 and len(words) == 101
    circle = words[-1]
    assert circle.text == "circle" and circle.positions[0] > WINDOW  # in the second window: 77 + position
    assert windows[1][circle.positions[0] - WINDOW][0] == tok.encode("circle")[0]
    assert words[74].positions == (75,) and words[75].positions == (WINDOW + 1,)  # 75 tokens per window


def test_embedding_is_one_word(tok, tmp_path):
    save_file({"emb_params": torch.randn(3, 32)}, str(tmp_path / "glassy.safetensors"))
    prompt = "a red embedding:glassy circle"
    windows, words = prompt_words(prompt, tok, embeddings_dir=str(tmp_path), width=32)
    def plain(ws):  # embedding vectors are new objects on every read: compare their values
        return [[(t if isinstance(t, int) else (t.name, t.vector.tolist()), w) for t, w in win] for win in ws]

    assert plain(windows) == plain(prompt_windows(prompt, tok, str(tmp_path), width=32))
    assert [w.label for w in words] == ["a", "red", "embedding:glassy", "circle"]
    assert len(words[2].positions) == 3


def test_word_maps_sum_the_tokens_and_normalise():
    tm = torch.zeros(1, 77, 2, 2)
    tm[0, 3, 0, 0], tm[0, 4, 1, 1], tm[0, 5] = 1.0, 3.0, 0.5
    from glass_diffusion.sd_core.attention_maps import Word
    out = word_maps(tm, [Word("ab", "ab", (3, 4)), Word("c", "c", (5,))])
    assert torch.allclose(out[0, 0], torch.tensor([[1 / 3, 0.0], [0.0, 1.0]]))
    assert out[0, 1].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    raw = word_maps(tm, [Word("ab", "ab", (3, 4))], normalise=False)
    assert raw[0, 0].tolist() == [[1.0, 0.0], [0.0, 3.0]]

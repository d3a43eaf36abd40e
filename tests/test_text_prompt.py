"""Prompt syntax and 77-token windows, pinned to ComfyUI's rules (expected values written by hand from the
rules in sd_core/prompt.py's docstring, not computed by the code under test)."""
import logging

import pytest
import torch
from safetensors.torch import save_file

from _text_util import SMALL_BPE
from glass_diffusion.sd_core.prompt import (EmbeddingVector, load_embedding, pack_windows, parse_weights,
                                            prompt_windows, split_embeddings, tokenize_prompt)
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer


@pytest.mark.parametrize("text, expected", [
    ("", []),
    ("a cat", [("a cat", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("(((cat)))", [("cat", 1.1 * 1.1 * 1.1)]),
    ("(cat:1.3)", [("cat", 1.3)]),
    ("((cat:1.5))", [("cat", 1.5)]),  # an explicit weight replaces, it does not multiply
    ("((cat):1.5)", [("cat", 1.5 * 1.1)]),
    ("a (b:0.5) c", [("a ", 1.0), ("b", 0.5), (" c", 1.0)]),
    ("(a (b:0.5) c:1.2)", [("a ", 1.2), ("b", 0.5), (" c", 1.2)]),
    ("(a (b) c:2)", [("a ", 2.0), ("b", 2.0 * 1.1), (" c", 2.0)]),
    ("(cat:0)", [("cat", 0.0)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("(cat:1e2)", [("cat", 100.0)]),
    ("(cat: 1.5 )", [("cat", 1.5)]),
    ("(cat:1_0)", [("cat", 10.0)]),  # Python's float() reads it
    ("(a:1.2:1.3)", [("a:1.2", 1.3)]),  # the LAST colon
    ("(time 12:30)", [("time 12", 30.0)]),
    ("(a\nb:1.2)", [("a\nb", 1.2)]),
    ("\\(cat\\)", [("(cat)", 1.0)]),
    ("\\((cat)\\)", [("(", 1.0), ("cat", 1.1), (")", 1.0)]),
    ("(\\(cat\\):1.2)", [("(cat)", 1.2)]),
    ("a\\b", [("a\\b", 1.0)]),  # other backslashes stay
    ("(cat", [("(cat", 1.0)]),  # unclosed: literal
    ("cat)", [("cat)", 1.0)]),
    ("a) (b) c (d)", [("a) (b) c (d)", 1.0)]),  # a stray ')' makes later brackets literal
    ("((a)", [("(a", 1.1)]),
    ("(a))(b)", [("a", 1.1), (")(b)", 1.0)]),
    ("()", []),
    ("a () b", [("a ", 1.0), (" b", 1.0)]),
    ("(cat:abc)", [("cat:abc", 1.1)]),  # malformed weight: (text) rule, colon kept
    ("(:1.5)", [(":1.5", 1.1)]),  # colon at position 0 is no weight
    ("(cat:)", [("cat:", 1.1)]),
    ("[cat] {dog}", [("[cat] {dog}", 1.0)]),  # A1111's [] is not ComfyUI syntax
])
def test_parse_weights(text, expected):
    assert parse_weights(text) == expected


def test_malformed_and_odd_weights_warn(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_weights("(cat:abc) ok") == [("cat:abc", 1.1), (" ok", 1.0)]
    assert "malformed prompt weight 'abc'" in caplog.text and "(cat:abc)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert parse_weights("(cat:inf)") == [("cat", float("inf"))]
    assert "not finite" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_weights("(cat:1.3) (dog) plain")
    assert caplog.text == ""  # well-formed prompts are quiet


@pytest.mark.parametrize("segment, pieces", [
    ("embedding:foo", ["embedding:foo"]),
    ("a embedding:foo b", ["a", "embedding:foo b"]),
    ("a\nembedding:foo", ["a", "embedding:foo"]),
    ("a  embedding:x", ["a ", "embedding:x"]),
    (" embedding:x", ["embedding:x"]),
    ("aembedding:foo", ["aembedding:foo"]),
    ("a,embedding:foo", ["a,embedding:foo"]),
])
def test_split_embeddings(segment, pieces):
    assert split_embeddings(segment) == pieces


class CharTokenizer:
    """Stub: one token per non-space character (its code point); start 1, end/pad 2."""
    bos_id, eos_id, pad_id = 1, 2, 2

    def encode(self, text):
        return [ord(c) for c in text if not c.isspace()]


X, Y = ord("x"), ord("y")


def window(tokens, weights=None):
    """Expected window written out: start, tokens (weights), end, padding to 77."""
    weights = weights or [1.0] * len(tokens)
    body = [(1, 1.0)] + list(zip(tokens, weights)) + [(2, 1.0)]
    return body + [(2, 1.0)] * (77 - len(body))


def win(text, **kw):
    return prompt_windows(text, CharTokenizer(), **kw)


def test_windows_plain_prompts():
    assert win("") == [window([])]
    assert win("()") == [window([])]
    assert win("x" * 75) == [window([X] * 75)]
    assert win("x" * 76) == [window([X] * 75), window([X])]  # one long group: cut at 75
    assert win("x" * 300) == [window([X] * 75)] * 4
    assert len(win("x" * 301)) == 5
    assert all(len(w) == 77 for w in win("x" * 1000))


def test_windows_keep_short_groups_whole():
    # 70 tokens, then a 7-token group that does not fit: the window is closed, the group moves on
    assert win("x" * 70 + "(yyyyyyy:1.2)") == [
        [(1, 1.0)] + [(X, 1.0)] * 70 + [(2, 1.0)] * 6,
        window([Y] * 7, [1.2] * 7)]
    # an 8-token group is long: it fills the window and continues
    assert win("x" * 70 + "(yyyyyyyy:1.2)") == [
        [(1, 1.0)] + [(X, 1.0)] * 70 + [(Y, 1.2)] * 5 + [(2, 1.0)],
        window([Y] * 3, [1.2] * 3)]
    # exactly fitting: 68 + 7 = 75
    assert win("x" * 68 + "(yyyyyyy)") == [window([X] * 68 + [Y] * 7, [1.0] * 68 + [1.1] * 7)]
    # groups are weighted segments, not words: a plain multi-word prompt is one long group
    assert win("x" * 73 + " yy yy") == [window([X] * 73 + [Y, Y]), window([Y, Y])]


def test_windows_weights():
    assert win("a(b:0)c(d:-1)(e:1e2)") == [window([97, 98, 99, 100, 101], [1.0, 0.0, 1.0, -1.0, 100.0])]


def test_pack_windows_directly():
    groups = [[(5, 1.0)] * 74, [(6, 2.0)] * 3]  # short group, 74 + 3 > 75
    assert pack_windows(groups, bos=1, eos=2) == [window([5] * 74), window([6] * 3, [2.0] * 3)]
    assert pack_windows([], bos=1, eos=2, pad=0) == [[(1, 1.0), (2, 1.0)] + [(0, 1.0)] * 75]


def test_segments_are_tokenized_separately():
    tok = CLIPTokenizer(SMALL_BPE)
    groups = tokenize_prompt("photo(graph)ic", tok)
    assert [[t for t, _ in g] for g in groups] == [tok.encode("photo"), tok.encode("graph"), tok.encode("ic")]
    assert [w for g in groups for _, w in g] == [1.0] * len(tok.encode("photo")) + [1.1] * len(
        tok.encode("graph")) + [1.0] * len(tok.encode("ic"))


# ------------------------------------------------------------------ embeddings

@pytest.fixture
def emb_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    d = tmp_path / "embeddings"
    (d / "sub").mkdir(parents=True)
    vec = {}
    vec["two"] = torch.randn(2, 768, generator=g)
    torch.save({"string_to_param": {"*": vec["two"]}, "name": "two", "step": 100}, d / "two.pt")  # A1111 .pt
    vec["one"] = torch.randn(1, 768, generator=g)
    save_file({"emb_params": vec["one"]}, str(d / "one.safetensors"))  # A1111 .safetensors
    vec["xl"] = torch.randn(2, 768, generator=g)
    save_file({"clip_g": torch.randn(2, 1280, generator=g), "clip_l": vec["xl"]}, str(d / "xl.safetensors"))
    vec["diff"] = torch.randn(768, generator=g)
    torch.save({"<diff-token>": vec["diff"]}, d / "diff.bin")  # diffusers learned_embeds.bin
    vec["ten"] = torch.randn(10, 768, generator=g)
    save_file({"emb_params": vec["ten"]}, str(d / "sub" / "ten.safetensors"))
    (d / "broken.pt").write_bytes(b"this is not a torch file")
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, tmp_path / "outside.pt")
    return d, vec


def vectors(group):
    return torch.stack([t.vector for t, _ in group])


def test_embedding_formats(emb_dir):
    d, vec = emb_dir
    assert torch.equal(load_embedding(d / "two.pt"), vec["two"])
    assert torch.equal(load_embedding(d / "one.safetensors"), vec["one"])
    assert torch.equal(load_embedding(d / "xl.safetensors"), vec["xl"])  # the clip_l part
    assert torch.equal(load_embedding(d / "diff.bin"), vec["diff"][None])
    tok = CharTokenizer()
    for text, name in [("embedding:two", "two"), ("embedding:two.pt", "two"), ("embedding:one", "one"),
                       ("embedding:xl", "xl"), ("embedding:diff", "diff"), ("embedding:ten", "ten"),
                       ("embedding:sub/ten", "ten")]:
        groups = tokenize_prompt(text, tok, d)
        assert len(groups) == 1 and all(isinstance(t, EmbeddingVector) for t, _ in groups[0]), text
        assert torch.equal(vectors(groups[0]), vec[name].reshape(-1, 768)), text


def test_prompt_of_only_an_embedding(emb_dir):
    d, vec = emb_dir
    w = win("embedding:two", embeddings_dir=d)
    assert len(w) == 1 and len(w[0]) == 77
    assert [t for t, _ in w[0][:1]] == [1] and [t for t, _ in w[0][3:]] == [2] * 74
    assert torch.equal(torch.stack([t.vector for t, _ in w[0][1:3]]), vec["two"])


def test_embedding_text_around_and_weights(emb_dir):
    d, vec = emb_dir
    groups = tokenize_prompt("ab embedding:one, cd (embedding:two:1.5)", CharTokenizer(), d)
    kinds = [[t if isinstance(t, int) else t.name for t, _ in g] for g in groups]
    assert kinds == [[97, 98], ["one"], [44, 99, 100], ["two", "two"]]
    assert [w for _, w in groups[3]] == [1.5, 1.5]


def test_embeddings_are_not_split_when_short(emb_dir):
    d, _ = emb_dir
    w = win("x" * 74 + " embedding:two", embeddings_dir=d)  # 74 + 2 > 75: moves whole
    assert len(w) == 2 and [t for t, _ in w[0][75:]] == [2, 2]
    assert all(isinstance(t, EmbeddingVector) for t, _ in w[1][1:3])
    w = win("x" * 70 + " embedding:ten", embeddings_dir=d)  # 10 vectors: long, split 5 + 5
    assert sum(isinstance(t, EmbeddingVector) for t, _ in w[0]) == 5
    assert sum(isinstance(t, EmbeddingVector) for t, _ in w[1]) == 5


def test_missing_and_broken_embeddings_warn_and_are_left_out(emb_dir, caplog):
    d, _ = emb_dir
    with caplog.at_level(logging.WARNING):
        assert win("ab embedding:nope cd", embeddings_dir=d) == [window([97, 98, 99, 100])]
    assert "embedding:nope not found" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert win("ab embedding:broken", embeddings_dir=d) == [window([97, 98])]
    assert "embedding:broken is left out" in caplog.text and "broken.pt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # names never leave the folder
        assert win("embedding:../outside", embeddings_dir=d) == [window([])]
    assert "embedding:../outside not found" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert win("ab embedding:", embeddings_dir=d) == [window([97, 98])]
    assert "with no name" in caplog.text


def test_embedding_without_folder_is_text(caplog):
    with caplog.at_level(logging.WARNING):
        assert win("embedding:two") == [window([ord(c) for c in "embedding:two"])]
    assert "no embeddings folder" in caplog.text


# ------------------------------------------------------------------ properties on random prompts

from hypothesis import given, settings, strategies as st  # noqa: E402

ATOMS = ["x", "yy", " ", "\n", ",", "(", ")", "\\(", "\\)", ":", ":1.5", ":0", ":-2", ":abc", "x" * 9, "z" * 40]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ATOMS), max_size=60))
def test_windows_keep_every_token_in_order(atoms):
    text = "".join(atoms)
    tok = CharTokenizer()
    groups = tokenize_prompt(text, tok)
    windows = pack_windows(groups, tok.bos_id, tok.eos_id)
    assert all(len(w) == 77 and w[0] == (1, 1.0) for w in windows)
    body = []
    for w in windows:
        ids = [t for t, _ in w]
        end = ids.index(2)  # the first end token closes the content (the stub never emits 1 or 2)
        assert set(ids[end:]) == {2} and all(wt == 1.0 for _, wt in w[end:])
        assert end - 1 <= 75
        body += w[1:end]
    assert body == [item for g in groups for item in g]  # nothing lost, duplicated or reordered
    # a short group (< 8 tokens) never straddles two windows
    for g in groups:
        if 0 < len(g) < 8:
            assert any(any(w[i:i + len(g)] == g for i in range(77)) for w in windows)

"""Procedural scenes, caption grammar, the pixel scorer and the tiny model's vocabulary (no trained model needed)."""
import json
from dataclasses import replace

import numpy as np
import pytest

from glass_diffusion.sd_core import toy_data
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer, vocab_from_merges

from _scorer import accuracy_table, analyse, scene_want, score


def test_drawing_is_deterministic_and_64px():
    a, caps_a, _ = toy_data.make_batch(3, 16)
    b, caps_b, _ = toy_data.make_batch(3, 16)
    c, _, _ = toy_data.make_batch(4, 16)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caps_a == caps_b
    assert not np.array_equal(a, c)


def test_held_out_pairs_never_drawn_for_training():
    _, _, scenes = toy_data.make_batch(0, 2000)
    pairs = {(s.colour, s.shape) for s in scenes}
    assert not pairs & toy_data.HELD_OUT
    assert len(pairs) == len(toy_data.COLOURS) * len(toy_data.SHAPES) - len(toy_data.HELD_OUT)
    held = toy_data.evaluation_scenes(50, held_out=True)
    assert all((s.colour, s.shape) in toy_data.HELD_OUT for s in held)


def test_caption_round_trips_through_parse_prompt():
    for s in toy_data.evaluation_scenes(200):
        p = toy_data.parse_prompt(s.caption())
        assert (p["colour"], p["shape"], p["size"], p["row"], p["col"], p["background"]) == \
            (s.colour, s.shape, s.size, s.row, s.col, s.background)


def test_scorer_is_exact_on_drawn_scenes():
    images, _, scenes = toy_data.make_batch([9, 9], 400)
    acc = accuracy_table(images, scenes)
    assert acc["colour"] == 1.0 and acc["position"] == 1.0 and acc["shape"] == 1.0
    held_images, _, held = toy_data.make_batch([9, 10], 100, held_out=True)
    assert accuracy_table(held_images, held)["shape"] == 1.0


def test_scorer_catches_wrong_pictures():
    scene = toy_data.Scene("red", "circle", "large", 0, 0, "blue")
    img = toy_data.draw(scene)
    other = toy_data.draw(toy_data.Scene("green", "square", "large", 2, 2, "blue"))
    r = score(other, scene_want(scene))
    assert r["colour"] is False and r["position"] is False and r["shape"] is False
    blank = np.full_like(img, 128)
    assert analyse(blank)["colour"] is None
    assert score(blank, scene_want(scene))["colour"] is False


@pytest.mark.parametrize("shape", toy_data.SHAPES)
def test_scorer_shapes_survive_blur(shape):
    """Generated pictures are softer than drawings; a mild blur must not change the verdict."""
    from scipy import ndimage
    scene = toy_data.Scene("yellow", shape, "large", 1, 1, "black")
    img = ndimage.uniform_filter(toy_data.draw(scene).astype(np.float32), size=(3, 3, 1)).round().astype(np.uint8)
    assert score(img, scene_want(scene)) == {**score(img, scene_want(scene)), "colour": True, "shape": True,
                                             "position": True}


def test_vocabulary_is_clip_bpe_with_one_token_per_word(tmp_path):
    from glass_diffusion.sd_core.train_tiny import GrammarTokenizer, build_vocabulary, learn_merges
    vocab = build_vocabulary(tmp_path)
    merges = learn_merges(toy_data.grammar_words())
    assert vocab == vocab_from_merges(merges)  # OpenAI's id order: bytes, bytes</w>, merges, specials
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == vocab
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version")
    tok = CLIPTokenizer(tmp_path)
    for w in toy_data.grammar_words():
        assert tok.tokens(w) == [w + "</w>"]
    assert tok.bos_id == len(vocab) - 2 and tok.eos_id == len(vocab) - 1
    ids = GrammarTokenizer(tmp_path).ids(["a red circle", ""])
    assert ids.shape == (2, 77)
    assert ids[0, :5].tolist() == [tok.bos_id, *tok.encode("a red circle"), tok.eos_id]
    assert (ids[0, 5:] == tok.eos_id).all() and ids[1, 0] == tok.bos_id and (ids[1, 1:] == tok.eos_id).all()
    # words outside the grammar still tokenize (byte fallback), they just were never trained
    assert len(tok.encode("a magenta hexagon")) > 3


def test_diversity_and_centre_spread_measure_what_differs_between_seeds():
    from _scorer import centre_spread, diversity
    base = [toy_data.Scene("red", "square", "large", 1, 1, "blue"), toy_data.Scene("white", "circle", "small", 0, 2, "black")]
    same = np.stack([[toy_data.draw(s) for s in base]] * 3)  # (S=3, N=2, H, W, 3): every seed the same picture
    assert diversity(same) == 0.0 and centre_spread(same) == 0.0
    moved = np.stack([[toy_data.draw(s) for s in base], [toy_data.draw(replace(s, dx=3, dy=-4)) for s in base]])
    assert centre_spread(moved) == pytest.approx(5.0, abs=0.01)
    want = np.mean([np.abs(moved[0, n].astype(float) - moved[1, n]).mean() for n in range(2)])
    assert diversity(moved) == pytest.approx(want) and diversity(moved) > 1.0


def test_jitter_spans_its_range_and_keeps_every_shape_inside_the_picture():
    images, _, scenes = toy_data.make_batch([5, 5], 3000)
    J, M = toy_data.JITTER, toy_data.MARGIN
    middle = [(s.dx, s.dy) for s in scenes if (s.row, s.col) == (1, 1)]
    assert {d for d, _ in middle} == set(range(-J, J + 1)) == {d for _, d in middle}  # never clamped there
    for s in scenes:  # clamped towards the picture, never past the cell's own offsets
        assert -J <= s.dx <= J and -J <= s.dy <= J
    bg = np.array([toy_data.COLOURS[s.background] for s in scenes], np.uint8)[:, None, None]  # (N, 1, 1, 3)
    edge = np.ones((64, 64), bool)
    edge[M:-M, M:-M] = False
    assert (images[:, edge] == bg[:, 0]).all()  # a border of MARGIN px is background in every picture
    for size, r in toy_data.SIZES.items():  # at the picture's edge the shape touches the margin for some offset
        left = [s for s in scenes if s.col == 0 and s.size == size]
        assert min(12 + s.dx - r for s in left) == max(M, 12 - J - r)

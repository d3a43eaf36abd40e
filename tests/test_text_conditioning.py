"""Prompt -> CONDITIONING. Tiny CLIP: the weighting rules, windows, clip skip and embeddings, each against a
direct computation. Full-size CLIP (random weights): our conditioning against transformers' CLIPTextModel
plus the weighting rule, for plain, weighted, long and clip-skip prompts, to 1e-5."""
import logging
import time

import pytest
import torch
from safetensors.torch import save_file

from _parity_util import SD15_HF_CLIP, fullsize_lock, hf_clip, random_init_
from _text_util import SMALL_BPE, hf_ids, hf_tokenizer, load_corpus, real_vocab_path, write_hf_folder
from glass_diffusion.sd_core.clip import CLIPTextConfig, CLIPTextModel
from glass_diffusion.sd_core.conditioning import encode_prompt
from glass_diffusion.sd_core.prompt import prompt_windows
from glass_diffusion.sd_core.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer(SMALL_BPE)


@pytest.fixture(scope="module")
def tiny(tok):
    cfg = CLIPTextConfig.tiny(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return random_init_(CLIPTextModel(cfg), seed=3).eval()


def ids_of(windows):
    return torch.tensor([[t for t, _ in w] for w in windows])


def weights_of(windows):
    return torch.tensor([[w for _, w in win] for win in windows], dtype=torch.float64)


def long_plain_text(count, lo=160, hi=220):
    """A corpus prompt without bracket or colon syntax, cut to between lo and hi tokens."""
    for p in load_corpus():
        words = "".join(" " if c in "()\\:" else c for c in p).split(" ")
        for n in range(len(words)):
            text = " ".join(words[:n])
            if lo < count(text) < hi:
                return text
    raise AssertionError("no long prompt in the corpus")


def empty_ids(tok):
    return torch.tensor([[tok.bos_id, tok.eos_id] + [tok.eos_id] * 75])


@torch.no_grad()
def test_plain_prompt_is_the_clip_output(tiny, tok):
    [[z, extra]] = encode_prompt(tiny, tok, "a photo of a cat")
    out = tiny(ids_of(prompt_windows("a photo of a cat", tok)))
    assert z.shape == (1, 77, 32) and z.dtype == torch.float32
    assert torch.equal(z, out.z) and torch.equal(extra["pooled_output"], out.pooled)
    assert list(extra) == ["pooled_output"]


@torch.no_grad()
def test_comfy_weighting_interpolates_from_the_empty_prompt(tiny, tok):
    text = "a (red:1.5) cat on ((grass)), (sky:0) (sea:-1)"
    windows = prompt_windows(text, tok)
    z_raw = tiny(ids_of(windows)).z[0]  # (77, D)
    z_empty = tiny(empty_ids(tok)).z[0]
    w = weights_of(windows)[0]
    assert sorted(set(w.tolist())) == [-1.0, 0.0, 1.0, 1.1 * 1.1, 1.5]
    expected = z_empty + (z_raw - z_empty) * w[:, None].float()
    [[z, extra]] = encode_prompt(tiny, tok, text)
    torch.testing.assert_close(z[0], expected, rtol=0, atol=1e-6)
    unweighted = w == 1.0
    assert torch.equal(z[0][unweighted], z_raw[unweighted])  # weight-1 tokens untouched
    torch.testing.assert_close(z[0][w == 0], z_empty[w == 0], rtol=0, atol=1e-6)  # weight 0 = empty prompt
    assert torch.equal(extra["pooled_output"], tiny(ids_of(windows)).pooled)  # pooled is not weighted


@torch.no_grad()
def test_a1111_weighting_multiplies_and_restores_the_mean(tiny, tok):
    text = "a (red:1.5) cat, (blue:0.7)"
    windows = prompt_windows(text, tok)
    z_raw = tiny(ids_of(windows)).z
    scaled = z_raw * weights_of(windows)[..., None].float()
    expected = scaled * (z_raw.mean() / scaled.mean())
    [[z, _]] = encode_prompt(tiny, tok, text, weighting="a1111")
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)
    assert (z - encode_prompt(tiny, tok, text)[0][0]).abs().max() > 1e-3  # the two rules really differ
    with pytest.raises(ValueError, match="weighting"):
        encode_prompt(tiny, tok, text, weighting="nai")


@torch.no_grad()
def test_long_prompt_windows_are_encoded_separately(tiny, tok):
    text = long_plain_text(lambda t: len(tok.encode(t)))
    windows = prompt_windows(text, tok)
    assert len(windows) == 3
    [[z, extra]] = encode_prompt(tiny, tok, text)
    assert z.shape == (1, 3 * 77, 32)
    for k in range(3):
        torch.testing.assert_close(z[0, 77 * k:77 * (k + 1)], tiny(ids_of(windows[k:k + 1])).z[0], rtol=0, atol=1e-6)
    assert torch.equal(extra["pooled_output"], tiny(ids_of(windows[:1])).pooled)  # first window's


@torch.no_grad()
def test_clip_skip(tiny, tok):
    windows = prompt_windows("a (cat:1.2)", tok)
    for skip in (-1, -2):
        [[z, extra]] = encode_prompt(tiny, tok, "a (cat:1.2)", clip_skip=skip)
        raw, empty = tiny(ids_of(windows), layer=skip).z[0], tiny(empty_ids(tok), layer=skip).z[0]
        w = weights_of(windows)[0][:, None].float()
        torch.testing.assert_close(z[0], empty + (raw - empty) * w, rtol=0, atol=1e-6)
        assert torch.equal(extra["pooled_output"], tiny(ids_of(windows)).pooled)  # last layer, any skip
    for bad in (0, -3, 1):
        with pytest.raises(ValueError, match="clip_skip"):
            encode_prompt(tiny, tok, "a cat", clip_skip=bad)


def test_tokenizer_and_model_must_share_the_vocabulary(tok):
    other = CLIPTextModel(CLIPTextConfig.tiny())
    with pytest.raises(ValueError, match="different vocabularies"):
        encode_prompt(other, tok, "a cat")


@pytest.fixture
def tiny_embeddings(tmp_path):
    g = torch.Generator().manual_seed(1)
    vec = {"two": torch.randn(2, 32, generator=g)}
    torch.save({"string_to_param": {"*": vec["two"]}}, tmp_path / "two.pt")
    save_file({"emb_params": torch.randn(3, 48, generator=g)}, str(tmp_path / "wide.safetensors"))
    return tmp_path, vec


@torch.no_grad()
def test_embedding_vectors_replace_token_embeddings(tiny, tok, tiny_embeddings):
    d, vec = tiny_embeddings
    [[z, extra]] = encode_prompt(tiny, tok, "a embedding:two cat", embeddings_dir=d)
    ids = torch.tensor([[tok.bos_id] + tok.encode("a") + [0, 0] + tok.encode("cat") + [tok.eos_id]])
    ids = torch.cat([ids, torch.full((1, 77 - ids.shape[1]), tok.eos_id)], dim=1)
    embeds = tiny.text_model.embeddings.token_embedding(ids)
    n = 1 + len(tok.encode("a"))
    embeds[0, n:n + 2] = vec["two"]
    out = tiny(ids, inputs_embeds=embeds)
    torch.testing.assert_close(z, out.z, rtol=0, atol=1e-6)
    torch.testing.assert_close(extra["pooled_output"], out.pooled, rtol=0, atol=1e-6)
    assert (z - encode_prompt(tiny, tok, "a cat")[0][0]).abs().max() > 1e-3


@torch.no_grad()
def test_wrong_width_embedding_is_left_out_with_a_warning(tiny, tok, tiny_embeddings, caplog):
    d, _ = tiny_embeddings
    with caplog.at_level(logging.WARNING):
        [[z, extra]] = encode_prompt(tiny, tok, "embedding:wide a cat", embeddings_dir=d)
    assert "embedding:wide has width 48 but this CLIP has 32; left out" in caplog.text
    [[z_plain, extra_plain]] = encode_prompt(tiny, tok, "a cat")
    assert torch.equal(z, z_plain) and torch.equal(extra["pooled_output"], extra_plain["pooled_output"])
    # ComfyUI keeps the weights at the original positions: the 3 dropped slots' weight lands on "a cat"
    [[zw, _]] = encode_prompt(tiny, tok, "(embedding:wide:1.5) a cat", embeddings_dir=d)
    raw = tiny(ids_of(prompt_windows("a cat", tok))).z[0]
    empty = tiny(empty_ids(tok)).z[0]
    w = torch.ones(77)
    w[1:4] = 1.5
    torch.testing.assert_close(zw[0], empty + (raw - empty) * w[:, None], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ full size against transformers

REAL = real_vocab_path()


@pytest.fixture(scope="module")
def fullsize(tmp_path_factory):
    """Our full-size CLIP text encoder with random weights, the same weights in transformers' CLIPTextModel,
    and both tokenizers. Uses the real vocabulary when present, else the small one (embedding table sized
    to it; every other dimension is ViT-L/14's)."""
    src = REAL or SMALL_BPE
    ours_tok = CLIPTokenizer(src)
    hf_tok = hf_tokenizer(write_hf_folder(src, tmp_path_factory.mktemp("hfvocab")))
    hf_cfg = dict(SD15_HF_CLIP, vocab_size=ours_tok.vocab_size, bos_token_id=ours_tok.bos_id,
                  eos_token_id=ours_tok.eos_id)
    cfg = CLIPTextConfig(vocab_size=ours_tok.vocab_size, bos_token_id=ours_tok.bos_id,
                         eos_token_id=ours_tok.eos_id)
    with fullsize_lock():
        with torch.device("meta"):
            ours = CLIPTextModel(cfg)
        ours = random_init_(ours.to_empty(device="cpu"), seed=11).eval()
        ckpt = {"cond_stage_model.transformer." + k: v for k, v in ours.state_dict().items()}
        theirs = hf_clip(ckpt, hf_cfg)
        yield ours, ours_tok, theirs, hf_tok
        del ours, theirs, ckpt


def ref_windows(hf_tok, segments):
    """Reference windows for prompts whose pieces never meet a window edge as a short group: tokens of each
    (text, weight) segment from transformers' tokenizer, cut every 75 tokens, start/end/padding around."""
    toks = [(t, w) for text, w in segments for t in hf_ids(hf_tok, text)]
    bos, eos = hf_tok.bos_token_id, hf_tok.eos_token_id
    windows = []
    for i in range(0, max(len(toks), 1), 75):
        body = [(bos, 1.0)] + toks[i:i + 75] + [(eos, 1.0)]
        windows.append(body + [(eos, 1.0)] * (77 - len(body)))
    return torch.tensor([[t for t, _ in w] for w in windows]), torch.tensor([[w for _, w in x] for x in windows])


@torch.no_grad()
def reference(theirs, hf_tok, segments, layer=-1, weighting="comfy"):
    ids, w = ref_windows(hf_tok, segments)
    empty = torch.tensor([[hf_tok.bos_token_id] + [hf_tok.eos_token_id] * 76])
    out = theirs(input_ids=torch.cat([ids, empty]), output_hidden_states=True)
    z = out.last_hidden_state if layer == -1 else theirs.final_layer_norm(out.hidden_states[layer])
    z, z_empty, w = z[:-1], z[-1:], w[..., None].float()
    if weighting == "comfy":
        z = torch.where(w != 1.0, z_empty + (z - z_empty) * w, z)
    else:
        z = torch.stack([zk * wk * (zk.mean() / (zk * wk).mean()) for zk, wk in zip(z, w)])
    return z.reshape(1, -1, z.shape[-1]), out.pooler_output[:1]


def test_fullsize_matches_transformers(fullsize):
    ours, ours_tok, theirs, hf_tok = fullsize
    long_text = long_plain_text(lambda t: len(hf_ids(hf_tok, t)))
    mid_text = " ".join(long_text.split()[:60])
    cases = {
        "plain": ("a photo of an astronaut riding a horse on mars, highly detailed",
                  [("a photo of an astronaut riding a horse on mars, highly detailed", 1.0)], -1, "comfy"),
        "weighted": ("a (red:1.3) fox in ((deep snow)), [winter] (sunset:0.8)",
                     [("a ", 1.0), ("red", 1.3), (" fox in ", 1.0), ("deep snow", 1.1 * 1.1),
                      (", [winter] ", 1.0), ("sunset", 0.8)], -1, "comfy"),
        "long": (long_text, [(long_text, 1.0)], -1, "comfy"),
        "long weighted": (f"({mid_text}:1.2) tail (words:0.5)",
                          [(mid_text, 1.2), (" tail ", 1.0), ("words", 0.5)], -1, "comfy"),
        "clip skip -2": ("a (red:1.3) fox in ((deep snow)), [winter] (sunset:0.8)",
                         [("a ", 1.0), ("red", 1.3), (" fox in ", 1.0), ("deep snow", 1.1 * 1.1),
                          (", [winter] ", 1.0), ("sunset", 0.8)], -2, "comfy"),
        "long clip skip -12": (long_text, [(long_text, 1.0)], -12, "comfy"),
        "a1111": ("a (red:1.3) fox, (snow:0.8)", [("a ", 1.0), ("red", 1.3), (" fox, ", 1.0), ("snow", 0.8)],
                  -1, "a1111"),
    }
    errs, t0 = {}, time.time()
    for name, (text, segments, layer, weighting) in cases.items():
        ref_ids, _ = ref_windows(hf_tok, segments)
        assert torch.equal(ids_of(prompt_windows(text, ours_tok)), ref_ids), name  # same windows
        [[z, extra]] = encode_prompt(ours, ours_tok, text, clip_skip=layer, weighting=weighting)
        z_ref, pooled_ref = reference(theirs, hf_tok, segments, layer, weighting)
        assert z.shape == z_ref.shape == (1, 77 * ref_ids.shape[0], 768), name
        errs[name] = max((z - z_ref).abs().max().item(), (extra["pooled_output"] - pooled_ref).abs().max().item())
    print(f"\nfull-size conditioning vs transformers (vocab {ours_tok.vocab_size}), max abs err: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" ({time.time() - t0:.0f} s)")
    assert max(errs.values()) <= 1e-5, errs

"""Our CLIP text encoder against transformers' CLIPTextModel loaded by its own from_pretrained from the same
checkpoint tensors. fp32; tolerance max|ours - theirs| <= 1e-4 * max|theirs|."""
import pytest
import torch
from _parity_util import SD15_HF_CLIP, hf_clip, hf_clip_config_for, max_rel_err, read_tensors

TOL = 1e-4


@pytest.fixture(scope="module", params=["tiny", pytest.param("full", marks=pytest.mark.fullsize)])
def case(request):
    sd = request.getfixturevalue("tiny_sd" if request.param == "tiny" else "sd15_full")
    hf_config = SD15_HF_CLIP if request.param == "full" else hf_clip_config_for(sd.config)
    theirs = hf_clip(read_tensors(sd.path, "cond_stage_model.transformer."), hf_config)
    return sd.model.clip, theirs, request.param


def prompts(cfg):
    """bos, n words, eos, padded with eos (SD 1.x style), for a short, a medium and a full prompt."""
    g = torch.Generator().manual_seed(4)
    T = cfg.max_positions
    ids = torch.full((3, T), cfg.eos_token_id)
    ids[:, 0] = cfg.bos_token_id
    for row, n in enumerate([5, 30, T - 2]):
        ids[row, 1:1 + n] = torch.randint(0, cfg.bos_token_id, (n,), generator=g)
    return ids


@torch.no_grad()
def test_clip_matches_transformers(case):
    ours, theirs, size = case
    ids = prompts(ours.config)
    out = ours(ids, output_hidden_states=True)
    ref = theirs(input_ids=ids, output_hidden_states=True)
    skip = ours(ids, layer=-2)
    errs = {
        "last": max_rel_err(out.z, ref.last_hidden_state),
        "penultimate+final_ln": max_rel_err(skip.z, theirs.final_layer_norm(ref.hidden_states[-2])),
        "pooled": max_rel_err(out.pooled, ref.pooler_output),
        "hidden_states": max(max_rel_err(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True)),
    }
    print(f"\nclip parity size={size}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(e <= TOL for e in errs.values()), errs
    assert max_rel_err(skip.z, out.z) > 1e-2  # clip skip really picks another layer

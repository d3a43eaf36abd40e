"""Our VAE against diffusers' AutoencoderKL holding the same single-file weights, converted by diffusers' own
LDM converters. fp32; tolerance max|ours - theirs| <= 1e-4 * max|theirs|."""
import pytest
import torch
from _parity_util import diffusers_vae, ldm_config_for, max_rel_err, read_tensors, v1_inference_config

TOL = 1e-4


@pytest.fixture(scope="module", params=["tiny", pytest.param("full", marks=pytest.mark.fullsize)])
def case(request):
    sd = request.getfixturevalue("tiny_sd" if request.param == "tiny" else "sd15_full")
    original = v1_inference_config() if request.param == "full" else ldm_config_for(sd.config)
    theirs = diffusers_vae(read_tensors(sd.path, "first_stage_model."), original, norm_groups=sd.config.vae.norm_groups)
    return sd.model.vae, theirs, request.param


@torch.no_grad()
def test_vae_posterior_matches_diffusers(case):
    ours, theirs, size = case
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    post, ref = ours.encode(x), theirs.encode(x).latent_dist
    errs = {"mean": max_rel_err(post.mean, ref.mean), "logvar": max_rel_err(post.logvar, ref.logvar),
            "std": max_rel_err(post.std, ref.std)}
    print(f"\nvae encode parity size={size}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(e <= TOL for e in errs.values()), errs


@torch.no_grad()
def test_vae_decode_matches_diffusers(case):
    ours, theirs, size = case
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    img, ref = ours.decode(z), theirs.decode(z).sample
    err = max_rel_err(img, ref)
    print(f"\nvae decode parity size={size}: {err:.2e} (max |img| {ref.abs().max():.3g})")
    assert img.shape == (2, 3, 64, 64)
    assert err <= TOL

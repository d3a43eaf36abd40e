"""Full-size SD 2.x parity (random seeded weights of the real shapes, written as a real single-file checkpoint):
the UNet against diffusers' UNet2DConditionModel built by diffusers' own LDM converters from the v2-inference(-v)
config, x0 for eps and v against k-diffusion's CompVisDenoiser / CompVisVDenoiser around it, and the OpenCLIP
ViT-H/14 text tower against transformers' CLIPTextModel as diffusers' single-file converter builds it (23 layers:
its last hidden state is SD 2.x's penultimate) and with every layer and the projection kept.
Our networks take the file's tensors by load_state_dict(assign=True) and the references the tensors their
converters make of the same ones, so each part is in memory once. fp32; tolerance max|ours - theirs| <=
1e-4 * max|theirs|. Small latents and one evaluation each."""
import pytest
import torch
from _parity_util import (LDMWrapper, diffusers_unet, hf_open_clip, hf_open_clip_config_for, max_rel_err,
                          read_tensors, v2_inference_config)
from safetensors import safe_open

import _kdiff
from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.family import SD2, SD2_V, detect
from glass_diffusion.sd_core.open_clip import OpenCLIPTextModel
from glass_diffusion.sd_core.unet import UNetModel

pytestmark = pytest.mark.fullsize
TOL = 1e-4
UNET = "model.diffusion_model."
OPEN = "cond_stage_model.model."


@pytest.fixture(scope="module", autouse=True)
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


def ours(cls, config, tensors: dict, prefix: str):
    """Our network of `config` holding the file's tensors (names under `prefix`), no copy."""
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, strict=True, assign=True)
    return model.eval()


def test_the_file_is_detected_as_sd2(sd2_full):
    with safe_open(str(sd2_full.path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        row, evidence = detect(shapes, f.get_tensor)
    # random norm biases (std 0.02) read as eps by ComfyUI's heuristic, as a real 512 file would
    assert row is SD2 and "OpenCLIP" in evidence and "<= 0.09" in evidence
    assert shapes[OPEN + "transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert shapes[UNET + "input_blocks.1.1.proj_in.weight"] == (320, 320)  # linear


@torch.no_grad()
def test_unet_and_x0_match_diffusers_and_k_diffusion(sd2_full):
    E = _kdiff.load_external()
    ckpt = read_tensors(sd2_full.path, UNET)
    acp = read_tensors(sd2_full.path, "alphas_cumprod")["alphas_cumprod"]
    unet = ours(UNetModel, sd2_full.config.unet, ckpt, UNET)
    theirs = diffusers_unet(ckpt, v2_inference_config(v=True))
    del ckpt
    assert theirs.config.use_linear_projection and list(theirs.config.attention_head_dim) == [5, 10, 20, 20]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 1024, generator=g)
    t = torch.tensor([3.0, 999.0])
    out = unet(x, t, ctx)
    ref = theirs(x, t, encoder_hidden_states=ctx).sample
    errs = {"unet": max_rel_err(out, ref)}
    sigma = torch.tensor([0.5, 14.0])
    noisy = x * sigma.view(-1, 1, 1, 1)
    for family, wrapper in ((SD2, E.CompVisDenoiser), (SD2_V, E.CompVisVDenoiser)):
        x0 = DiffusionModel.build(unet, family).denoise(noisy, sigma, ctx)
        ref_x0 = wrapper(LDMWrapper(theirs, acp), quantize=True)(noisy, sigma, cond=ctx)
        errs[f"x0 {family.prediction}"] = max_rel_err(x0, ref_x0)
    print("\nsd2 full-size unet parity: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(e <= TOL for e in errs.values()), errs
    assert max_rel_err(out[0], out[1]) > 1e-2


@torch.no_grad()
def test_open_clip_matches_transformers(sd2_full):
    ckpt = read_tensors(sd2_full.path, OPEN)
    clip = sd2_full.config.clip
    g = torch.Generator().manual_seed(4)
    ids = torch.zeros((2, 77), dtype=torch.long)  # start, words, end, pad 0
    ids[:, 0] = clip.bos_token_id
    for row, n in enumerate([7, 75]):
        ids[row, 1:1 + n] = torch.randint(1, clip.bos_token_id, (n,), generator=g)
        ids[row, 1 + n] = clip.eos_token_id
    text = ours(OpenCLIPTextModel, clip, ckpt, OPEN)
    last, pen = text(ids), text(ids, layer=-2)
    diffusers_23 = hf_open_clip(ckpt, hf_open_clip_config_for(clip, layers=23))  # as diffusers loads SD 2.x
    errs = {"penultimate (diffusers' 23-layer model)": max_rel_err(pen.z, diffusers_23(input_ids=ids).last_hidden_state)}
    del diffusers_23
    renamed = {"te." + k[len(OPEN):]: v for k, v in ckpt.items()}
    del ckpt
    full = hf_open_clip(renamed, hf_open_clip_config_for(clip), prefix="te.", projection=True)
    ref = full(input_ids=ids, output_hidden_states=True)
    errs["last"] = max_rel_err(last.z, ref.last_hidden_state)
    errs["penultimate"] = max_rel_err(pen.z, full.text_model.final_layer_norm(ref.hidden_states[-2]))
    errs["pooled+projection"] = max_rel_err(last.pooled, ref.text_embeds)
    print("\nsd2 full-size open_clip parity: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(e <= TOL for e in errs.values()), errs
    assert max_rel_err(pen.z, last.z) > 1e-2

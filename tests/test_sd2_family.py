"""SD 2.x through the family seam, on tiny models (fast): detection of 512-eps / 768-v / inpainting files with
the evidence named, refusals, the checkpoint round trip, the OpenCLIP text tower and the SD 2.x UNet against
transformers / diffusers (their own single-file converters), v-prediction sampling against diffusers' Euler
scheduler (with and without RescaleCFG) and k-diffusion's samplers on its CompVisVDenoiser, zero-terminal-SNR
sigmas against diffusers, the two nodes, and prompt encoding with SD 2.x's pad token and default layer.
fp32; tolerances relative to the output's scale."""
from dataclasses import replace

import pytest
import torch
from _ckpt_util import write
from _parity_util import (LDMWrapper, diffusers_unet, hf_open_clip, hf_open_clip_config_for, ldm_v2_config_for,
                          max_rel_err, read_tensors, save_single_file)

import _kdiff
from glass_diffusion.sd_core import samplers as S
from glass_diffusion.sd_core.checkpoint import CheckpointError, load_checkpoint
from glass_diffusion.sd_core.diffusion import DiffusionModel
from glass_diffusion.sd_core.family import (SD1, SD2, SD2_INPAINT, SD2_V, V_PREDICTION_KEY, detect, detect_family,
                                            family_of_config)
from glass_diffusion.sd_core.guidance import CFGDenoiser
from glass_diffusion.sd_core.model import SDConfig, StableDiffusion
from glass_diffusion.sd_core.random_weights import build_random
from glass_diffusion.sd_core.schedules import ModelSampling

TOL = 1e-4
OPEN = "cond_stage_model.model."
UNET = "model.diffusion_model."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def full_shapes():
    """{name: shape} of a full-size SD 2.x checkpoint (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = StableDiffusion(SDConfig.sd2(), SD2)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    """A tiny SD 2.x model (OpenCLIP text tower, linear projections, head_dim 16) and its single-file checkpoint."""
    config = SDConfig.tiny_sd2()
    model = build_random(config, seed=0, family=SD2_V)
    path = save_single_file(model, tmp_path_factory.mktemp("tiny_sd2") / "tiny_sd2.safetensors")
    return model, path, config


# ------------------------------------------------------------------------------------------ detection

def _with_bias_std(shapes, std):
    """A read() giving the v-prediction key a bias of population std `std`."""
    g = torch.Generator().manual_seed(0)
    n = shapes[V_PREDICTION_KEY][0]
    t = torch.randn(n, generator=g, dtype=torch.float64)
    t = (t - t.mean()) / t.std(unbiased=False) * std
    return lambda name: t.float() if name == V_PREDICTION_KEY else None


@pytest.mark.parametrize("std, name", [(0.12, "sd2-v"), (0.05, "sd2"), (0.0901, "sd2-v"), (0.0899, "sd2")])
def test_768_v_is_told_from_512_by_comfyuis_heuristic(full_shapes, std, name):
    row, evidence = detect(full_shapes, _with_bias_std(full_shapes, std))
    assert row.name == name
    assert "cond_stage_model.model.* (OpenCLIP text encoder)" in evidence and f"= {std:.3f}" in evidence
    assert ("v-prediction" if name == "sd2-v" else "eps-prediction") in evidence
    assert row.model_sampling().prediction == ("v" if name == "sd2-v" else "eps")


def test_inpainting_and_names_only(full_shapes):
    nine = {**full_shapes, UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}
    row, evidence = detect(nine, _with_bias_std(full_shapes, 0.2))  # 9 channels: eps whatever the bias says
    assert row is SD2_INPAINT and evidence.endswith("9 UNet input channels") and row.prediction == "eps"
    row, evidence = detect(full_shapes)  # shapes without values: eps (ComfyUI without the key)
    assert row is SD2 and "no model.diffusion_model.output_blocks.11.1" in evidence
    assert detect_family(list(full_shapes)) == "sd2"  # names only
    depth = {**full_shapes, UNET + "input_blocks.0.0.weight": (320, 5, 3, 3)}
    row, evidence = detect(depth)
    assert row.name == "sd2-other" and evidence.endswith("5 UNet input channels")
    unet_only = {k: s for k, s in full_shapes.items() if k.startswith(UNET)}
    row, evidence = detect(unet_only)
    assert row is SD2 and evidence.startswith("context width 1024")


def test_sd2_rows():
    for row in (SD2, SD2_V, SD2_INPAINT):
        assert row.line == "SD 2.x" and row.latent is SD1.latent and row.schedule == SD1.schedule
        recipe = row.text[0]
        assert (recipe.encoder, recipe.prefix, recipe.pad_id, recipe.default_layer) == ("open-clip-h", OPEN, 0, -2)
    assert SD2_INPAINT.is_inpaint and not SD2_V.is_inpaint
    assert family_of_config(SDConfig.tiny_sd2(inpainting=True)) is SD2_INPAINT
    with pytest.raises(ValueError, match="2 candidates"):  # 512-eps and 768-v have the same structure
        family_of_config(SDConfig.tiny_sd2())


def test_loading_detects_v_from_the_file(tmp_path):
    """Through load_checkpoint, on a small model with the real block layout (output_blocks.11 exists)."""
    unet = replace(SDConfig.tiny_sd2().unet, model_channels=16, channel_mult=(1, 1, 1, 1), num_res_blocks=2,
                   attention_levels=(0, 1, 2), norm_groups=8, head_dim=8)
    config = replace(SDConfig.tiny_sd2(), unet=unet)
    model = build_random(config, seed=1, family=SD2)
    for std, family in ((0.2, SD2_V), (0.02, SD2)):
        with torch.no_grad():
            bias = model.state_dict()[V_PREDICTION_KEY]
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(2)) * std)
        path = save_single_file(model, tmp_path / f"small_{std}.safetensors")
        loaded = load_checkpoint(path)
        assert loaded.family is family and loaded.config == config
        handle = DiffusionModel.from_checkpoint(loaded)
        assert handle.sampling.prediction == family.prediction


def test_refusals_name_the_family_and_the_evidence(tmp_path, tiny2):
    _, path, _ = tiny2
    state = read_tensors(path)
    no_text = {k: v for k, v in state.items() if not k.startswith(OPEN)}
    with pytest.raises(CheckpointError, match=r"has an SD 2\.x UNet but no cond_stage_model\.model\.\* \(OpenCLIP\) "
                                              r"text encoder"):
        load_checkpoint(write(tmp_path / "no_text.safetensors", no_text))
    for keys, label in [({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, "an SDXL"),
                        ({"model.diffusion_model.joint_blocks.0.x": torch.zeros(1)}, "an SD 3"),
                        ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, "a Flux")]:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(write(tmp_path / "other.safetensors", keys))
        assert f"looks like {label} checkpoint (found " in str(info.value)
        assert str(info.value).endswith("Glass Diffusion loads SD 1.x and SD 2.x only")


def test_round_trip_and_missing_logit_scale(tmp_path, tiny2):
    model, path, config = tiny2
    loaded = load_checkpoint(path)
    assert loaded.family is SD2 and loaded.config == config  # tiny: no output_blocks.11, so eps is the guess
    assert type(loaded.clip).__name__ == "OpenCLIPTextModel"
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in loaded.state_dict().items())
    state = read_tensors(path)
    assert state[OPEN + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)  # packed, as in files
    del state[OPEN + "logit_scale"]
    again = load_checkpoint(write(tmp_path / "no_logit_scale.safetensors", state))
    assert again.clip.logit_scale.item() == pytest.approx(4.6052, abs=1e-4)


# ------------------------------------------------------------------------------------------ networks

def _sd2_ids(cfg):
    """start, n words, end, then pad 0 (SD 2.x's padding), for a short, a medium and a full prompt."""
    g = torch.Generator().manual_seed(4)
    T = cfg.max_positions
    ids = torch.zeros((3, T), dtype=torch.long)
    ids[:, 0] = cfg.bos_token_id
    for row, n in enumerate([5, 30, T - 2]):
        ids[row, 1:1 + n] = torch.randint(1, cfg.bos_token_id, (n,), generator=g)
        ids[row, 1 + n] = cfg.eos_token_id
    return ids


@torch.no_grad()
def test_open_clip_matches_transformers(tiny2):
    model, path, config = tiny2
    ckpt = read_tensors(path, OPEN)
    ours = model.clip
    theirs = hf_open_clip(ckpt, hf_open_clip_config_for(config.clip))
    renamed = {"te." + k[len(OPEN):]: v for k, v in ckpt.items()}
    with_proj = hf_open_clip(renamed, hf_open_clip_config_for(config.clip), prefix="te.", projection=True)
    ids = _sd2_ids(config.clip)
    last, pen = ours(ids), ours(ids, layer=-2)
    ref = theirs(input_ids=ids, output_hidden_states=True)
    ref_p = with_proj(input_ids=ids)
    errs = {"last": max_rel_err(last.z, ref.last_hidden_state),
            "penultimate": max_rel_err(pen.z, theirs.final_layer_norm(ref.hidden_states[-2])),
            "pooled+projection": max_rel_err(last.pooled, ref_p.text_embeds)}
    print("\nopen_clip tiny parity: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(e <= TOL for e in errs.values()), errs
    assert max_rel_err(pen.z, last.z) > 1e-2 and torch.equal(pen.pooled, last.pooled)


@torch.no_grad()
@pytest.mark.parametrize("v", [False, True])
def test_sd2_unet_matches_diffusers(tiny2, v):
    model, path, config = tiny2
    ckpt = read_tensors(path, UNET)
    theirs = diffusers_unet(ckpt, ldm_v2_config_for(config, v=v), norm_groups=config.unet.norm_groups)
    assert theirs.config.use_linear_projection and theirs.config.cross_attention_dim == 32
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    ctx = torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([1.0, 500.0, 999.0])
    err = max_rel_err(model.unet(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample)
    assert err <= TOL, err


# ------------------------------------------------------------------------------------------ sampling

@pytest.fixture(scope="module")
def v_setup(tiny2):
    model, path, config = tiny2
    theirs = diffusers_unet(read_tensors(path, UNET), ldm_v2_config_for(config, v=True),
                            norm_groups=config.unet.norm_groups)
    g = torch.Generator().manual_seed(5)
    pos, neg = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    handle = DiffusionModel.build(model.unet, SD2_V)
    return handle, theirs, pos, neg, read_tensors(path)["alphas_cumprod"]


@torch.no_grad()
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_v_prediction_euler_matches_diffusers(v_setup, rescale):
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    handle, theirs, pos, neg, _ = v_setup
    cfg = 5.0
    sch = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 prediction_type="v_prediction")
    sch.set_timesteps(timesteps=[999, 749, 499, 249, 1])
    sigmas = sch.sigmas.float()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * sigmas[0]
    model = handle.replace(rescale_cfg=rescale)
    denoiser = CFGDenoiser(model, [[pos, {}]], [[neg, {}]], cfg, x.shape)
    ours = S.sample_euler(denoiser, x, sigmas)
    lat = x.clone()
    for t in sch.timesteps:
        inp = sch.scale_model_input(torch.cat([lat, lat]), t)
        ctx = torch.cat([neg.expand(2, -1, -1), pos.expand(2, -1, -1)])
        v_u, v_c = theirs(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
        v_cfg = v_u + cfg * (v_c - v_u)
        if rescale:
            v_cfg = rescale_noise_cfg(v_cfg, v_c, guidance_rescale=rescale)
        lat = sch.step(v_cfg, t, lat).prev_sample
    err = max_rel_err(ours, lat)
    print(f"\nv euler vs diffusers rescale={rescale}: max rel err {err:.2e}")
    assert err < 1e-5, err
    if rescale:
        plain = S.sample_euler(CFGDenoiser(handle, [[pos, {}]], [[neg, {}]], cfg, x.shape), x, sigmas)
        assert max_rel_err(plain, ours) > 1e-3  # RescaleCFG changed the result


@torch.no_grad()
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "heun"])
def test_v_samplers_match_k_diffusion(v_setup, name):
    from glass_diffusion.sd_core.schedules import get_sigmas
    K, E = _kdiff.load(), _kdiff.load_external()
    handle, theirs, pos, _, acp = v_setup
    ref_denoiser = E.CompVisVDenoiser(LDMWrapper(theirs, acp), quantize=True)
    sigmas = get_sigmas("karras", handle.sampling, 4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * sigmas[0]
    ctx = pos.expand(2, -1, -1)
    ours = S.get_sampler(name)(lambda xx, s: handle.denoise(xx, s, ctx), x, sigmas, None, None)
    ref = getattr(K, f"sample_{name}")(lambda xx, s: ref_denoiser(xx, s, cond=ctx), x, sigmas, disable=True)
    err = max_rel_err(ours, ref)
    print(f"\n{name} (v) vs k-diffusion: max rel err {err:.2e}")
    assert err < 1e-5, f"{name}: {err:.2e}"


def test_zero_terminal_snr_sigmas_match_diffusers():
    from diffusers import EulerDiscreteScheduler
    ours = ModelSampling(SD2.schedule, "v", zsnr=True).sigmas.double()
    sch = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 rescale_betas_zero_snr=True)
    acp = sch.alphas_cumprod.double()  # diffusers clamps the last alphas_bar to 2**-24, ComfyUI to 4.897e-08
    theirs = ((1 - acp) / acp) ** 0.5
    err = ((ours[:-1] - theirs[:-1]).abs() / theirs[:-1]).max().item()
    print(f"\nzsnr sigmas vs diffusers: max rel err {err:.2e}")
    assert err < 1e-4, err
    assert ours[-1].item() == pytest.approx(((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08) ** 0.5, rel=1e-6)
    assert ours[0] == pytest.approx(ModelSampling(SD2.schedule, "v").sigmas[0].item(), rel=1e-6)


# ------------------------------------------------------------------------------------------ nodes and text

def test_model_sampling_node_returns_a_new_handle(tiny2):
    from glass_diffusion.nodes.sampling import GlassModelSamplingDiscrete, GlassRescaleCFG
    from glass_diffusion.nodes.types import GlassUNet, NodeInputError
    model, _, _ = tiny2
    h = GlassUNet(DiffusionModel.build(model.unet, SD2))
    (v,) = GlassModelSamplingDiscrete().patch(h, "v_prediction", zsnr=True)
    assert v.model.sampling.prediction == "v" and v.model.sampling.zsnr and v.model.unet is h.model.unet
    assert h.model.sampling.prediction == "eps" and not h.model.sampling.zsnr  # the input is untouched
    assert v.model.sampling.sigma_max.item() == pytest.approx(4518.0, rel=1e-3)
    (r,) = GlassRescaleCFG().patch(v, 0.7)
    assert r.model.rescale_cfg == 0.7 and v.model.rescale_cfg == 0.0 and r.model.sampling is v.model.sampling
    with pytest.raises(NodeInputError, match="'multiplier'"):
        GlassRescaleCFG().patch(v, 1.5)
    with pytest.raises(NodeInputError, match="'sampling'"):
        GlassModelSamplingDiscrete().patch(h, "lcm")


def test_text_encode_pads_with_0_and_reads_the_penultimate_layer(tiny2, tmp_path):
    from _nodes_util import write_vocabulary

    from glass_diffusion.nodes.loaders import GlassCheckpointLoader
    from glass_diffusion.nodes.runtime import settings_override
    from glass_diffusion.nodes.text import GlassTextEncode
    from glass_diffusion.sd_core.conditioning import encode_windows

    model, path, _ = tiny2
    (tmp_path / "checkpoints").mkdir()
    target = tmp_path / "checkpoints" / "sd2.safetensors"
    target.write_bytes(path.read_bytes())
    write_vocabulary(target.with_name("sd2.tokenizer"), model.config.clip.vocab_size)
    with settings_override(models_dir=tmp_path, device="cpu", dtype="fp32"):
        unet, clip, _ = GlassCheckpointLoader().load("sd2.safetensors", "fp32")
    assert unet.family is SD2 and clip.clip_skip == -2 and clip.tokenizer.pad_id == 0
    (cond,) = GlassTextEncode().encode(clip, "a red circle", "comfy")
    ids = clip.tokenizer.encode("a red circle")
    window = [(clip.tokenizer.bos_id, 1.0)] + [(i, 1.0) for i in ids] + [(clip.tokenizer.eos_id, 1.0)]
    window += [(0, 1.0)] * (77 - len(window))
    z, pooled = encode_windows(model.clip, [window], bos=clip.tokenizer.bos_id, eos=clip.tokenizer.eos_id, pad=0,
                               clip_skip=-2)
    assert torch.allclose(cond[0][0], z, atol=1e-6) and torch.allclose(cond[0][1]["pooled_output"], pooled, atol=1e-6)
    ids_t = torch.tensor([[w[0] for w in window]])
    assert torch.allclose(z, model.clip(ids_t, layer=-2).z, atol=1e-6)
    assert not torch.allclose(z, model.clip(ids_t, layer=-1).z, atol=1e-3)

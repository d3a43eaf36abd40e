"""save_checkpoint -> load_checkpoint round trips on tiny models: exact tensors, config, dtypes, atomic writes."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from glass_diffusion.sd_core.checkpoint import (CONFIG_METADATA_KEY, SCHEDULE_KEYS, infer_config, load_checkpoint,
                                               save_checkpoint, schedule_buffers)
from glass_diffusion.sd_core.model import SDConfig
from glass_diffusion.sd_core.family import SD1

from _ckpt_util import tiny_model, tiny_state, write

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same_state(model, expected: dict):
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_keeps_tensors_config_and_dtype(tmp_path, dtype):
    model = tiny_model(seed=1)
    path = save_checkpoint(model, tmp_path / "m.safetensors", dtype=dtype)
    loaded = load_checkpoint(path)  # dtype None: keep the file's float dtype
    assert loaded.config == model.config
    expected = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    assert_same_state(loaded, expected)
    assert loaded.clip.text_model.embeddings.position_ids.dtype == torch.int64
    assert not loaded.training


@pytest.mark.parametrize("file_dtype", DTYPES)
@pytest.mark.parametrize("load_dtype", DTYPES)
def test_load_converts_to_requested_dtype(tmp_path, file_dtype, load_dtype):
    model = tiny_model(seed=2)
    path = save_checkpoint(model, tmp_path / "m.safetensors", dtype=file_dtype)
    loaded = load_checkpoint(path, device="cpu", dtype=load_dtype)
    expected = {k: v.to(file_dtype).to(load_dtype) if v.is_floating_point() else v
                for k, v in model.state_dict().items()}
    assert_same_state(loaded, expected)


def test_loaded_model_runs_like_the_saved_one(tmp_path):
    model = tiny_model(seed=3)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors", dtype=torch.float32))
    ids = torch.tensor([[998, 5, 17, 999, 999]])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        # identical weights; kernels may still sum in another order (buffer alignment), hence a tight allclose
        ctx = model.clip(ids).z
        torch.testing.assert_close(loaded.clip(ids).z, ctx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.unet(x, t, ctx), model.unet(x, t, ctx), rtol=1e-5, atol=1e-5)
        img = torch.rand(1, 3, 16, 16) * 2 - 1
        torch.testing.assert_close(loaded.vae.decode(loaded.vae.encode(img).mode()),
                                   model.vae.decode(model.vae.encode(img).mode()), rtol=1e-5, atol=1e-5)


def test_file_layout(tmp_path):
    model = tiny_model()
    path = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"note": "hello"})
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids").dtype == torch.int64
        assert all(f.get_tensor(k).dtype == torch.float32 for k in SCHEDULE_KEYS)
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert keys == set(model.state_dict()) | set(SCHEDULE_KEYS)
    assert SDConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY])) == model.config
    assert meta["note"] == "hello"


def test_schedule_buffers_match_the_sd1_schedule():
    b = schedule_buffers(SD1.schedule)
    assert set(b) == set(SCHEDULE_KEYS)
    assert all(v.shape == (1000,) and v.dtype == torch.float32 for v in b.values())
    # the LDM DDPM class's quantities, written out independently in float64 numpy
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1 - betas)
    prev = np.append(1.0, acp[:-1])
    var = betas * (1 - prev) / (1 - acp)
    ref = {"betas": betas, "alphas_cumprod": acp, "alphas_cumprod_prev": prev,
           "sqrt_alphas_cumprod": np.sqrt(acp), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - acp),
           "log_one_minus_alphas_cumprod": np.log(1 - acp), "sqrt_recip_alphas_cumprod": np.sqrt(1 / acp),
           "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / acp - 1), "posterior_variance": var,
           "posterior_log_variance_clipped": np.log(np.maximum(var, 1e-20)),
           "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - acp),
           "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - acp)}
    for k, v in ref.items():
        np.testing.assert_allclose(b[k].double().numpy(), v, rtol=1e-6, atol=0, err_msg=k)
    sigmas = ((1 - b["alphas_cumprod"].double()) / b["alphas_cumprod"].double()).sqrt()
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)  # sd1-facts: 0.0292 .. 14.61
    assert sigmas[-1].item() == pytest.approx(14.61, abs=5e-3)
    assert b["posterior_variance"][0] == 0 and b["alphas_cumprod_prev"][0] == 1


def test_schedule_matches_diffusers_scaled_linear():
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    b = schedule_buffers(SD1.schedule)
    assert torch.allclose(b["betas"], ref.betas.float(), rtol=1e-5)
    assert torch.allclose(b["alphas_cumprod"], ref.alphas_cumprod.float(), rtol=1e-4)


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(tiny_model(), path)
    assert path.read_bytes() == b"precious"
    save_checkpoint(tiny_model(), path, overwrite=True)
    assert load_checkpoint(path).config == SDConfig.tiny()


def test_save_leaves_no_partial_file_on_error(tmp_path, monkeypatch):
    import glass_diffusion.sd_core.checkpoint as ckpt

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", fail)
    path = tmp_path / "m.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(), path)
    assert os.listdir(tmp_path) == []

    path.write_bytes(b"old version")  # an error while overwriting keeps the old file intact
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(), path, overwrite=True)
    assert os.listdir(tmp_path) == ["m.safetensors"] and path.read_bytes() == b"old version"


def test_save_writes_safetensors_only(tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        save_checkpoint(tiny_model(), tmp_path / "m.ckpt")


def test_without_metadata_the_config_is_inferred_from_shapes(tmp_path):
    state = tiny_state(seed=4)
    loaded = load_checkpoint(write(tmp_path / "raw.safetensors", state))
    tiny = SDConfig.tiny()
    # shapes fix everything but head counts and GroupNorm groups, which take the SD 1.x values
    assert loaded.config.unet == type(tiny.unet)(**{**tiny.unet.__dict__, "num_heads": 8, "norm_groups": 32})
    assert loaded.config.clip == type(tiny.clip)(**{**tiny.clip.__dict__, "heads": 1})
    assert loaded.config.vae == type(tiny.vae)(**{**tiny.vae.__dict__, "norm_groups": 32})
    assert_same_state(loaded, state)


@pytest.mark.parametrize("inpainting", [False, True])
def test_infer_config_of_the_sd15_layout(inpainting):
    from _ckpt_util import read_tsv
    shapes = {k: s for k, (s, _) in read_tsv().items()}
    if inpainting:
        shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert infer_config(shapes) == SDConfig.sd15(inpainting=inpainting)


def test_inpainting_model_roundtrip_without_metadata(tmp_path):
    state = tiny_state(seed=5, inpainting=True)
    loaded = load_checkpoint(write(tmp_path / "inpaint.safetensors", state))
    assert loaded.config.unet.in_channels == 9
    assert_same_state(loaded, state)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_formats_load(tmp_path, suffix):
    state = tiny_state(seed=6)
    loaded = load_checkpoint(write(tmp_path / f"m{suffix}", state))
    assert_same_state(loaded, state)
    # the loaded tensors own their memory: deleting the file changes nothing
    os.unlink(tmp_path / f"m{suffix}")
    assert_same_state(loaded, state)


def test_legacy_non_zip_pickle_loads(tmp_path):
    state = tiny_state(seed=7)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path, _use_new_zipfile_serialization=False)
    assert_same_state(load_checkpoint(path), state)


def test_dtype_none_takes_the_files_main_float_dtype(tmp_path):
    state = tiny_state(seed=8)
    mixed = {k: v.half() if v.is_floating_point() and not k.startswith("model.") else v for k, v in state.items()}
    loaded = load_checkpoint(write(tmp_path / "mixed.safetensors", mixed))  # UNet fp32, VAE + CLIP (most) fp16
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float16, torch.int64}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_straight_to_cuda(tmp_path, suffix):
    model = tiny_model(seed=9)
    path = save_checkpoint(model, tmp_path / "m.safetensors", dtype=torch.float32)
    if suffix == ".ckpt":
        path = write(tmp_path / "m.ckpt", model.state_dict())
    loaded = load_checkpoint(path, device="cuda", dtype=torch.float16)
    assert all(t.device.type == "cuda" for t in loaded.state_dict().values())
    expected = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    for k, v in loaded.state_dict().items():
        assert v.dtype == expected[k].dtype and torch.equal(v.cpu(), expected[k]), k


def test_saved_file_gets_the_usual_mode_not_the_temp_files_0600(tmp_path):
    umask = os.umask(0o022)  # the process umask (read once at import by the module; unchanged since)
    os.umask(umask)
    path = save_checkpoint(tiny_model(), tmp_path / "m.safetensors")
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the process's file mappings")
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16])
def test_loaded_weights_do_not_keep_the_file_mapped(tmp_path, file_dtype):
    """safetensors hands out views of its memory-mapped file: a weight (or int64 position_ids) kept as such a view
    would keep the whole file mapped and its pages counted in the process's memory after loading."""
    import gc

    from glass_diffusion.sd_core.checkpoint import load_checkpoint, save_checkpoint
    from glass_diffusion.sd_core.model import SDConfig
    from glass_diffusion.sd_core.random_weights import build_random
    path = save_checkpoint(build_random(SDConfig.tiny(), seed=2), tmp_path / "m.safetensors", dtype=file_dtype)
    model = load_checkpoint(path, dtype=torch.float32)
    gc.collect()
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert model.unet.input_blocks[0][0].weight.dtype == torch.float32

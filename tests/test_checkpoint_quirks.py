"""Each quirk of real SD 1.x files loads to exactly the tensors it holds (declared transforms 1-6)."""
import pytest
import torch

from glass_diffusion.sd_core.checkpoint import SCHEDULE_KEYS, load_checkpoint, load_vae, schedule_buffers
from glass_diffusion.sd_core.model import SDConfig
from glass_diffusion.sd_core.vae import AutoencoderKL
from glass_diffusion.sd_core.family import SD1

from _ckpt_util import tiny_state, write

POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
VAE = "first_stage_model."


def assert_loaded(model, expected: dict):
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_clip_keys_without_text_model_level(tmp_path):
    state = tiny_state(seed=10)
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in old
    assert_loaded(load_checkpoint(write(tmp_path / "old_clip.safetensors", old)), state)


def test_position_ids_missing_are_recreated(tmp_path):
    state = tiny_state(seed=11)
    without = {k: v for k, v in state.items() if k != POS}
    loaded = load_checkpoint(write(tmp_path / "nopos.safetensors", without))
    assert torch.equal(loaded.state_dict()[POS], torch.arange(77).unsqueeze(0))
    assert_loaded(loaded, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_position_ids_are_rounded_to_int64(tmp_path, dtype):
    state = tiny_state(seed=12)
    noisy = dict(state)
    noisy[POS] = (torch.arange(77, dtype=torch.float32) + torch.linspace(-0.3, 0.3, 77)).unsqueeze(0).to(dtype)
    loaded = load_checkpoint(write(tmp_path / "floatpos.safetensors", noisy), dtype=torch.float32)
    assert loaded.state_dict()[POS].dtype == torch.int64
    assert_loaded(loaded, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp32_fp16_bf16_files_keep_their_dtype(tmp_path, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_state(seed=13).items()}
    loaded = load_checkpoint(write(tmp_path / "m.safetensors", state))
    assert_loaded(loaded, state)


def ema_copies(state: dict) -> dict:
    """The LDM EMA naming: model_ema. + the UNet key after `model.` with its dots removed, plus two scalars."""
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1.0
           for k, v in state.items() if k.startswith("model.diffusion_model.")}
    return {**ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000)}


def test_full_file_with_ema_and_schedule_buffers(tmp_path):
    state = tiny_state(seed=14)
    full = {**state, **ema_copies(state), **schedule_buffers(SD1.schedule)}
    assert "model_ema.diffusion_modelinput_blocks00weight" in full
    loaded = load_checkpoint(write(tmp_path / "full.safetensors", full))
    assert_loaded(loaded, state)  # the non-EMA weights, the EMA copies differ by +1


def test_ckpt_with_state_dict_and_global_step(tmp_path):
    state = tiny_state(seed=15)
    full = {**state, **ema_copies(state), **schedule_buffers(SD1.schedule)}
    path = write(tmp_path / "v1.ckpt", full, wrap=True)
    assert set(torch.load(path, weights_only=True)) == {"state_dict", "global_step", "epoch"}
    assert_loaded(load_checkpoint(path), state)


def test_mixed_quirks_in_one_fp16_ckpt(tmp_path):
    """fp16 + old CLIP names + float position_ids + EMA + schedule buffers, loaded as fp32."""
    state = tiny_state(seed=16)
    quirky = {k.replace("transformer.text_model.", "transformer."): v.half() if v.is_floating_point() else v.float()
              for k, v in state.items()}
    quirky.update(ema_copies(state), **schedule_buffers(SD1.schedule))
    loaded = load_checkpoint(write(tmp_path / "quirky.ckpt", quirky, wrap=True), dtype=torch.float32)
    assert_loaded(loaded, {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()})


def test_ignored_keys_do_not_change_the_inferred_config(tmp_path):
    state = tiny_state(seed=17)
    a = load_checkpoint(write(tmp_path / "a.safetensors", state))
    b = load_checkpoint(write(tmp_path / "b.safetensors", {**state, **ema_copies(state), **schedule_buffers(SD1.schedule)}))
    assert a.config == b.config
    assert not set(SCHEDULE_KEYS) & set(b.state_dict())


# ---------------------------------------------------------------------------------------------- standalone VAE

def vae_state(seed=20) -> dict:
    return {k[len(VAE):]: v for k, v in tiny_state(seed).items() if k.startswith(VAE)}


def loss_keys() -> dict:
    """A few keys of the LPIPS / discriminator loss network kept in training VAE files."""
    return {"loss.logvar": torch.zeros(()), "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
            "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4)}


@pytest.mark.parametrize("prefixed", [False, True])
@pytest.mark.parametrize("with_loss", [False, True])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_standalone_vae(tmp_path, prefixed, with_loss, suffix):
    state = vae_state()
    raw = {(VAE + k if prefixed else k): v for k, v in state.items()}
    if with_loss:
        raw.update(loss_keys())
    vae = load_vae(write(tmp_path / f"vae{suffix}", raw, wrap=suffix == ".ckpt"))
    assert isinstance(vae, AutoencoderKL)
    assert vae.encoder.conv_in.weight.shape[0] == SDConfig.tiny().vae.base_channels
    assert_loaded(vae, state)


def test_vae_from_full_checkpoint_and_dtype(tmp_path):
    state = tiny_state(seed=21)
    vae = load_vae(write(tmp_path / "full.safetensors", {**state, **schedule_buffers(SD1.schedule)}), dtype=torch.bfloat16)
    assert_loaded(vae, {k[len(VAE):]: v.bfloat16() for k, v in state.items() if k.startswith(VAE)})


def test_vae_attention_stored_as_linear(tmp_path):
    state = vae_state(seed=22)
    linear = {k: v.flatten(1) if ".mid.attn_1." in k and k.endswith("weight") and v.ndim == 4 else v
              for k, v in state.items()}
    assert linear["decoder.mid.attn_1.q.weight"].ndim == 2
    assert_loaded(load_vae(write(tmp_path / "vae.safetensors", linear)), state)


def test_vae_config_comes_from_metadata_when_present(tmp_path):
    from glass_diffusion.sd_core.checkpoint import save_checkpoint
    from _ckpt_util import tiny_model
    path = save_checkpoint(tiny_model(seed=23), tmp_path / "m.safetensors")
    assert load_vae(path).config == SDConfig.tiny().vae  # norm_groups 8 from metadata, not the inferred 32

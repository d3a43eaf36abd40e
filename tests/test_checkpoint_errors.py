"""Bad files fail with a CheckpointError that names the file and the keys; nothing in a pickle ever runs."""
import os
import pickle
import re
import warnings

import pytest
import torch

from glass_diffusion.sd_core.checkpoint import CheckpointError, load_checkpoint, load_vae, save_checkpoint

from _ckpt_util import tiny_model, tiny_state, write

UNET_OUT = "model.diffusion_model.out.2.weight"


def load_error(path, loader=load_checkpoint) -> CheckpointError:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
        with pytest.raises(CheckpointError) as info:
            loader(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err).startswith(f"{path}: ") and err.path == str(path)
    return err


# ---------------------------------------------------------------------------------------------- code in pickles

class Payload:
    """Unpickling this calls os.mkdir(marker): the marker proves whether code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("nested", [False, True])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, nested):
    marker = tmp_path / "pwned"
    obj = tiny_state()
    obj["model.diffusion_model.evil"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": obj, "global_step": 1} if nested else obj, path)
    err = load_error(path)
    assert "refused" in str(err) and "mkdir" in str(err) and "nothing in it was run" in str(err)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_vae(path)
    assert not marker.exists()


def test_plain_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=2))
    err = load_error(path)
    assert "refused" in str(err) and not marker.exists()
    # the control: an ordinary unpickler runs the payload, so the test above could fail
    pickle.loads(pickle.dumps({"w": Payload(control)}, protocol=2))
    assert control.is_dir()


# ---------------------------------------------------------------------------------------------- bad files

def test_file_not_found(tmp_path):
    err = load_error(tmp_path / "nope.safetensors")
    assert str(err).endswith("file not found")
    assert str(load_error(tmp_path / "nope.ckpt", load_vae)).endswith("file not found")


def test_directory(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    assert "is a directory" in str(load_error(tmp_path / "dir.safetensors"))


def test_unsupported_extension(tmp_path):
    path = write(tmp_path / "m.safetensors", tiny_state()).rename(tmp_path / "m.onnx")
    assert "unsupported file type '.onnx'" in str(load_error(path))


@pytest.mark.parametrize("name", ["t.safetensors", "t.ckpt"])
def test_truncated(tmp_path, name):
    full = write(tmp_path / name, tiny_state()).read_bytes()
    path = tmp_path / ("cut_" + name)
    path.write_bytes(full[: len(full) // 2])
    assert re.search(r": truncated", str(load_error(path)))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_empty_file(tmp_path, suffix):
    (tmp_path / f"e{suffix}").write_bytes(b"")
    assert str(load_error(tmp_path / f"e{suffix}")).endswith("is empty (0 bytes)")


@pytest.mark.parametrize("content", [b"hello, this is not a model\n" * 20, bytes(range(256)) * 8])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_not_a_checkpoint(tmp_path, content, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(content)
    msg = str(load_error(path))
    assert ("not a safetensors file" in msg) if suffix == ".safetensors" else \
        ("not a PyTorch checkpoint" in msg or "truncated or corrupt" in msg)


def test_pickle_of_something_else(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "holds a list, not a state dict" in str(load_error(tmp_path / "list.pt"))
    torch.save({"w": torch.zeros(2), "note": "hi", "n": 3}, tmp_path / "mixed.pt")
    err = load_error(tmp_path / "mixed.pt")
    assert "2 entries are not tensors: note, n" in str(err) and err.keys == ["note", "n"]


# ---------------------------------------------------------------------------------------------- keys and shapes

def test_missing_keys_lists_the_first_few_and_the_count(tmp_path):
    state = tiny_state()
    gone = [k for k in state if k.startswith("model.diffusion_model.output_blocks.")]
    assert len(gone) > 5
    for k in gone:
        del state[k]
    err = load_error(write(tmp_path / "m.safetensors", state, metadata=None))
    msg = str(err)
    assert f"{len(gone)} missing keys: " in msg and f"({len(gone)} in all)" in msg
    assert all(k in msg for k in gone[:5]) and gone[5] not in msg
    assert set(err.keys) == set(gone)


def test_unexpected_keys(tmp_path):
    state = tiny_state()
    state["model.diffusion_model.extra.weight"] = torch.zeros(3)
    state["something_else"] = torch.zeros(1)
    err = load_error(write(tmp_path / "m.safetensors", state))
    assert "2 unexpected keys: model.diffusion_model.extra.weight, something_else" in str(err)
    assert "missing" not in str(err)
    assert err.keys == ["model.diffusion_model.extra.weight", "something_else"]


def test_wrong_shape_against_the_metadata_config(tmp_path):
    # the tensor shapes decide the config (out channels 5, though the metadata says 4), so the weight that
    # disagrees with them is the bias left at 4
    path = save_checkpoint(tiny_model(), tmp_path / "good.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    state[UNET_OUT] = torch.zeros(5, 32, 3, 3, dtype=torch.float16)  # out channels 5, config says 4
    err = load_error(write(tmp_path / "bad.safetensors", state, metadata=meta))
    bias = UNET_OUT.replace(".weight", ".bias")
    assert f"1 keys with the wrong shape: {bias} expected [5], found [4]" in str(err)
    assert err.keys == [bias]


def test_missing_key_needed_to_infer_the_config(tmp_path):
    state = tiny_state()
    del state["model.diffusion_model.input_blocks.0.0.weight"]
    err = load_error(write(tmp_path / "m.safetensors", state))
    assert "cannot infer the UNet config: key model.diffusion_model.input_blocks.0.0.weight is missing" in str(err)


def test_bad_config_metadata(tmp_path):
    err = load_error(write(tmp_path / "m.safetensors", tiny_state(), metadata={"glass_diffusion.config": "{oops"}))
    assert "glass_diffusion.config is not a valid SDConfig" in str(err)


def test_duplicate_clip_key(tmp_path):
    state = tiny_state()
    state["cond_stage_model.transformer.final_layer_norm.weight"] = torch.ones(32)
    err = load_error(write(tmp_path / "m.safetensors", state))
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight appears twice" in str(err)


def test_vae_errors(tmp_path):
    err = load_error(write(tmp_path / "notvae.safetensors", {"foo.weight": torch.zeros(2)}), load_vae)
    assert "not a VAE: no encoder.conv_in.weight" in str(err) and "foo.weight" in str(err)
    state = {k[len("first_stage_model."):]: v for k, v in tiny_state().items() if k.startswith("first_stage_model.")}
    del state["decoder.conv_out.bias"]
    err = load_error(write(tmp_path / "vae.safetensors", state), load_vae)
    assert "1 missing keys: decoder.conv_out.bias" in str(err)

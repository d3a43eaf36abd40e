"""A new user's first run: shipped workflows and their input images found by name, the `workflows` listing,
and every case that used to be silent now errors or prints a note (sizes not a multiple of 8, prompt words
the built-in model does not know, an empty inpainting mask, a wrong --checkpoint file, a missing checkpoint).
Tiny models only; about 30 s on 2 idle cores."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from glass_diffusion.nodes import cli, notes, paths, runtime, shipped
from glass_diffusion.nodes.example_workflows import (INPUT_IMAGE, INPUT_IMAGES, INPUT_MASKED, USER_FILES,
                                                     WORKFLOWS, scene_image)
from glass_diffusion.nodes.registry import NODE_CLASS_MAPPINGS as N
from glass_diffusion.sd_core import builtin

from _nodes_util import CHECKPOINT, WORKFLOWS as WORKFLOWS_DIR, saved_pngs, tiny_env


def call(node_id, **inputs):
    cls = N[node_id]
    return getattr(cls(), cls.FUNCTION)(**inputs)


def _notes(caplog):
    return [r.getMessage() for r in caplog.records if r.name == notes.LOGGER.name]


# ------------------------------------------------------------------------------ shipped workflows, by name

def test_shipped_workflows_are_found_by_name_and_by_their_clone_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no workflows/ folder here
    assert shipped.workflow_names() == sorted(WORKFLOWS)
    for ref in ("text_to_image", "text_to_image.json", "workflows/text_to_image.json"):
        assert shipped.resolve_workflow(ref) == WORKFLOWS_DIR / "text_to_image.json"
    assert shipped.resolve_workflow("workflows/api/text_to_image.json") == WORKFLOWS_DIR / "api" / "text_to_image.json"
    assert shipped.find_workflow("elsewhere/text_to_image.json") is None and shipped.find_workflow("nope") is None
    (tmp_path / "text_to_image").write_text("{}")
    assert shipped.resolve_workflow("text_to_image") == tmp_path.joinpath("text_to_image").relative_to(tmp_path)
    with pytest.raises(FileNotFoundError, match="no shipped workflow of that name .*text_to_image"):
        shipped.resolve_workflow("txt2img")


def test_cli_runs_a_shipped_workflow_by_name_and_lists_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["workflows"]) == cli.OK
    listing = capsys.readouterr().out
    for name in WORKFLOWS:
        assert f"\n{name}\n" in f"\n{listing}"
    for needs in USER_FILES.values():
        assert all(f"needs {folder}/{file}" in listing for folder, file, _ in needs)
    assert cli.main(["run", "text_to_image", "--set", "Sampler.steps=2", "--device", "cpu"]) == cli.OK
    assert cli.main(["validate", "workflows/api/batch_of_seeds.json"]) == cli.OK
    assert [p.name for p in saved_pngs(tmp_path / "output")] == ["txt2img_00001_.png"]
    assert cli.main(["run", "txt2img"]) == cli.INVALID
    assert "no shipped workflow of that name" in capsys.readouterr().err


def test_a_missing_checkpoint_names_the_file_the_folder_and_only_the_folders_model_files(tmp_path, capsys):
    """inpaint_9channel without its checkpoint: which file, which folder; the choices are the built-in model and
    the checkpoints folder's model files, never other files."""
    (tmp_path / "models" / "checkpoints" / "sub").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "sub" / "mine.safetensors").write_bytes(b"")
    (tmp_path / "models" / "checkpoints" / "notes.txt").write_text("not a model")
    assert cli.main(["validate", "inpaint_9channel", "--models", str(tmp_path / "models")]) == cli.INVALID
    err = capsys.readouterr().err
    folder = tmp_path / "models" / "checkpoints"
    assert f"no checkpoint 'sd-v1-5-inpainting.safetensors' in {folder}: get that file and put it there" in err
    assert err.rstrip().endswith("choose one of: 'glass-tiny (built-in)', 'sub/mine.safetensors'"), err
    assert "notes.txt" not in err


def test_generate_refuses_a_file_that_is_no_checkpoint_and_lists_no_unrelated_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "x.bin").write_bytes(b"")
    (tmp_path / "README.md").write_text("# hello")
    assert cli.main(["generate", "x", "--checkpoint", "README.md"]) == cli.INVALID
    err = capsys.readouterr().err
    assert "'README.md': not a checkpoint file" in err and ".venv" not in err and "x.bin" not in err
    assert cli.main(["generate", "x", "--checkpoint", "missing.safetensors"]) == cli.INVALID
    err = capsys.readouterr().err
    assert "no such file" in err and "choose one of: 'glass-tiny (built-in)'" in err and ".venv" not in err
    assert not (tmp_path / "output").exists()


# ------------------------------------------------------------------------------ shipped input images

def test_shipped_input_images_are_what_our_code_draws():
    """Regenerate with `python -m glass_diffusion.nodes.example_workflows`."""
    assert shipped.input_names() == sorted(INPUT_IMAGES)
    for name, make in INPUT_IMAGES.items():
        with Image.open(shipped.INPUTS_DIR / name) as im:
            expected = make()
            assert im.mode == expected.mode and im.size == (builtin.RESOLUTION,) * 2
            np.testing.assert_array_equal(np.asarray(im), np.asarray(expected))
    masked = np.asarray(Image.open(shipped.INPUTS_DIR / INPUT_MASKED))
    assert (masked[..., 3] == 0).any() and (masked[..., 3] == 255).any()
    np.testing.assert_array_equal(masked[..., :3], np.asarray(scene_image()))


def test_load_image_takes_the_input_folder_first_then_the_shipped_image(tmp_path):
    with runtime.settings_override(input_dir=tmp_path):
        assert set(INPUT_IMAGES) <= set(N["GlassLoadImage"].INPUT_TYPES()["required"]["image"][0])
        assert N["GlassLoadImage"].VALIDATE_INPUTS(image=INPUT_MASKED) is True
        image, mask = call("GlassLoadImage", image=INPUT_MASKED)  # the input folder is empty: the shipped one
        assert image.shape == (1, 64, 64, 3) and mask.sum() > 0
        Image.new("RGB", (16, 8), (0, 255, 0)).save(tmp_path / INPUT_IMAGE)
        image, mask = call("GlassLoadImage", image=INPUT_IMAGE)  # the user's file of that name wins
        assert image.shape == (1, 8, 16, 3) and float(image[0, 0, 0, 1]) == 1.0
        for name in (f"{INPUT_MASKED} [output]", f"sub/{INPUT_MASKED}", "nope.png"):  # only plain shipped names
            assert paths.annotated_image_path(name) != shipped.INPUTS_DIR / INPUT_MASKED
        with pytest.raises(paths.OutsideFolderError):  # a name leaving the folder never falls back
            paths.annotated_image_path(f"../input/{INPUT_MASKED}")
        message = N["GlassLoadImage"].VALIDATE_INPUTS(image="nope.png")
        assert f"no such image file 'nope.png' in the input folder {tmp_path}" in message and "--input" in message


# ------------------------------------------------------------------------------ notes instead of silence

def test_sizes_that_are_not_a_multiple_of_8_get_a_note(caplog):
    caplog.set_level(logging.WARNING, notes.LOGGER.name)
    lat = call("GlassEmptyLatent", width=63, height=64, batch_size=1)[0]
    assert lat["samples"].shape[-2:] == (8, 7)
    assert _notes(caplog) == ["GlassEmptyLatent: input 'width': 63 px is not a multiple of 8; the latent is 7 wide, "
                              "so the picture will be 56 px"]
    caplog.clear()
    call("GlassEmptyLatent", width=64, height=64, batch_size=1)
    call("GlassLatentUpscale", samples=lat, upscale_method="nearest-exact", width=128, height=128, crop="disabled")
    assert _notes(caplog) == []
    call("GlassLatentUpscale", samples=lat, upscale_method="nearest-exact", width=100, height=128, crop="disabled")
    assert len(_notes(caplog)) == 1 and "100 px is not a multiple of 8" in _notes(caplog)[0]


def test_generate_refuses_sizes_that_are_not_a_multiple_of_8(tmp_path, capsys):
    assert cli.main(["generate", "--width", "63", "--output", str(tmp_path)]) == cli.INVALID
    assert "--width 63: must be a multiple of 8 pixels" in capsys.readouterr().err
    assert cli.main(["generate", "--height", "4", "--output", str(tmp_path)]) == cli.INVALID
    assert "try 8" in capsys.readouterr().err
    assert saved_pngs(tmp_path) == []


def test_vae_encode_of_a_size_not_a_multiple_of_8_gets_a_note(tmp_path_factory, tmp_path, caplog):
    env = tiny_env(tmp_path_factory)
    caplog.set_level(logging.WARNING, notes.LOGGER.name)
    with env.settings(tmp_path):
        vae = call("GlassCheckpointLoader", ckpt_name=CHECKPOINT, weight_dtype="fp32")[2]
        lat = call("GlassVAEEncode", pixels=torch.rand(1, 21, 30, 3), vae=vae)[0]
    assert lat["samples"].shape[-2:] == (2, 3)
    assert _notes(caplog) == ["GlassVAEEncode: input 'pixels': 30x21 px is not a multiple of 8; "
                              "the centre 24x16 px are encoded"]


def test_inpainting_with_an_empty_mask_says_so(tmp_path_factory, tmp_path, caplog):
    env = tiny_env(tmp_path_factory)
    caplog.set_level(logging.WARNING, notes.LOGGER.name)
    lat = call("GlassEmptyLatent", width=64, height=64, batch_size=1)[0]
    call("GlassSetNoiseMask", samples=lat, mask=torch.ones(1, 64, 64))
    assert _notes(caplog) == []
    call("GlassSetNoiseMask", samples=lat, mask=torch.zeros(1, 64, 64))
    assert len(_notes(caplog)) == 1 and "GlassSetNoiseMask: input 'mask': the mask is empty" in _notes(caplog)[0]
    caplog.clear()
    with env.settings(tmp_path):
        vae = call("GlassCheckpointLoader", ckpt_name=CHECKPOINT, weight_dtype="fp32")[2]
        call("GlassVAEEncodeForInpaint", pixels=torch.rand(1, 64, 64, 3), vae=vae, mask=torch.zeros(64, 64),
             grow_mask_by=6)
    assert len(_notes(caplog)) == 1 and "GlassVAEEncodeForInpaint: input 'mask': the mask is empty" in _notes(caplog)[0]


def test_inpainting_an_image_without_alpha_prints_the_note_on_the_cli(tmp_path, capsys):
    """inpaint_noise_mask on the shipped picture without a transparent area: the run works and says why nothing
    changed."""
    assert cli.main(["run", "inpaint_noise_mask", "--set", f"Load Image.image={INPUT_IMAGE}", "--set",
                     "Sampler.steps=1", "--output", str(tmp_path), "--device", "cpu"]) == cli.OK
    assert "note: GlassSetNoiseMask: input 'mask': the mask is empty" in capsys.readouterr().err


def test_prompt_words_the_builtin_model_lacks_get_a_note(tmp_path_factory, tmp_path, caplog):
    caplog.set_level(logging.WARNING, notes.LOGGER.name)
    with runtime.settings_override(models_dir=tmp_path, device="cpu"):
        clip = call("GlassCheckpointLoader", ckpt_name=builtin.NAME, weight_dtype="fp32")[1]
        for prompt in builtin.EXAMPLE_PROMPTS + ("a small (purple:1.4) triangle at the top ((on a green background))",):
            call("GlassTextEncode", clip=clip, text=prompt, weighting="comfy")
        assert _notes(caplog) == []
        call("GlassTextEncode", clip=clip, text="a Lighthouse at sunset, (red:1.2) circle, lighthouse", weighting="comfy")
    assert _notes(caplog) == ["GlassTextEncode: input 'text': the built-in model does not know the words "
                              "'lighthouse', 'sunset'; it knows only prompts such as "
                              f"{builtin.EXAMPLE_PROMPTS[0]!r} (see its model card), so the picture will not follow them"]
    caplog.clear()
    env = tiny_env(tmp_path_factory)  # another model (with a small test vocabulary too): no note
    with env.settings(tmp_path):
        clip = call("GlassCheckpointLoader", ckpt_name=CHECKPOINT, weight_dtype="fp32")[1]
        call("GlassTextEncode", clip=clip, text="a lighthouse at sunset", weighting="comfy")
    assert _notes(caplog) == []


def test_generate_prints_the_unknown_words_the_progress_and_what_each_file_shows(tmp_path, capsys):
    assert cli.main(["generate", "a red lighthouse", "a blue circle", "--steps", "2", "--seed", "5",
                     "--output", str(tmp_path), "--device", "cpu"]) == cli.OK
    captured = capsys.readouterr()
    files = saved_pngs(tmp_path)
    assert captured.out.splitlines() == [f'{files[0]}  seed 5  "a red lighthouse"',
                                         f'{files[1]}  seed 5  "a blue circle"']
    err = captured.err.splitlines()
    assert "note: GlassTextEncode: input 'text': the built-in model does not know the word 'lighthouse'; " \
           "it knows only prompts such as" in captured.err
    # not a terminal: one plain line per sampling step, per picture
    assert [line for line in err if line.startswith("GlassKSampler: step")] == ["GlassKSampler: step 1/2",
                                                                               "GlassKSampler: step 2/2"] * 2
    assert "[1/2] a red lighthouse" in err and "[2/2] a blue circle" in err
    assert json.loads(json.dumps(err[-1])).startswith("2 pictures in ")


def test_shipped_inputs_are_copied_into_a_folder_only_where_missing(tmp_path):
    """What the pack does for ComfyUI's input folder at start-up (the editor previews Load Image from there)."""
    (tmp_path / INPUT_IMAGE).write_bytes(b"mine")
    made = shipped.copy_inputs_into(tmp_path)
    assert made == [tmp_path / n for n in sorted(INPUT_IMAGES) if n != INPUT_IMAGE]
    assert (tmp_path / INPUT_IMAGE).read_bytes() == b"mine"  # never replaced
    assert (tmp_path / INPUT_MASKED).read_bytes() == (shipped.INPUTS_DIR / INPUT_MASKED).read_bytes()
    assert shipped.copy_inputs_into(tmp_path) == []


def test_user_folders_are_git_ignored_and_the_license_is_mit():
    """input/, output/, models/ of a run inside a clone never show up as changes; LICENSE is what pyproject says."""
    import shutil
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    assert "MIT License" in (repo / "LICENSE").read_text(encoding="utf-8")
    assert 'license = "MIT"' in (repo / "pyproject.toml").read_text(encoding="utf-8")
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("input/mine.png", "output/txt2img_00001_.png", "models/checkpoints/x.safetensors"):
        assert subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", path]).returncode == 0, path
    assert subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", "workflows/input/glass_scene.png"]).returncode == 1

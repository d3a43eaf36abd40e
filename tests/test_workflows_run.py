"""The shipped workflows: UI -> API conversion equals each API twin, the files match their Python description,
every workflow runs headless (run_workflow and the CLI) on tiny checkpoints written by the real exporter, and every
one but those needing a user's checkpoint (USER_FILES: inpaint_9channel, sd2_v_rescale_cfg) runs as shipped on the
built-in model with no models folder (plus `glass-diffusion generate`)."""
import json

import numpy as np
import pytest
from PIL import Image

from glass_diffusion.nodes import cli, progress
from glass_diffusion.nodes import image as image_nodes
from glass_diffusion.nodes.example_workflows import (CHECKPOINT, INPAINT_CHECKPOINT, INPUT_IMAGE, PACK_ID,
                                                     SD2_V_CHECKPOINT, USER_FILES, WORKFLOWS, build, node_size)
from glass_diffusion.nodes.executor import Executor, NodeExecutionError, run_workflow
from glass_diffusion.nodes.registry import NODE_CLASS_MAPPINGS
from glass_diffusion.nodes.workflow import convert_ui_to_api, load_workflow

from _nodes_util import (EXPECTED_FILES, SHIPPED_COUNTS, TINY_OVERRIDES, WORKFLOWS as WORKFLOWS_DIR, leftovers,
                         pixel_size, saved_pngs, tiny_env)

NAMES = sorted(WORKFLOWS)


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_workflow_is_shipped_in_both_formats():
    ui_files = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    api_files = sorted(p.stem for p in (WORKFLOWS_DIR / "api").glob("*.json"))
    assert ui_files == api_files == NAMES
    assert set(TINY_OVERRIDES) == set(NAMES) == set(EXPECTED_FILES)


@pytest.mark.parametrize("name", NAMES)
def test_ui_converts_to_its_api_twin(name):
    ui, api = _load(WORKFLOWS_DIR / f"{name}.json"), _load(WORKFLOWS_DIR / "api" / f"{name}.json")
    assert convert_ui_to_api(ui, NODE_CLASS_MAPPINGS) == api


@pytest.mark.parametrize("name", NAMES)
def test_files_match_their_description(name):
    """Regenerate with `python -m glass_diffusion.nodes.example_workflows` after changing a node's inputs."""
    g = build(name)
    assert _load(WORKFLOWS_DIR / f"{name}.json") == json.loads(json.dumps(g.ui()))
    assert _load(WORKFLOWS_DIR / "api" / f"{name}.json") == json.loads(json.dumps(g.api()))


@pytest.mark.parametrize("name", NAMES)
def test_ui_format_names_the_pack(name):
    ui = _load(WORKFLOWS_DIR / f"{name}.json")
    assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] == (max(link[0] for link in ui["links"]) if ui["links"] else 0)
    for node in ui["nodes"]:
        assert node["type"] in NODE_CLASS_MAPPINGS
        props = node["properties"]
        assert props["cnr_id"] == PACK_ID and props["Node name for S&R"] == node["type"]
    # every link is listed at both of its ends
    for link_id, src, slot, dst, dst_slot, typ in ui["links"]:
        nodes = {n["id"]: n for n in ui["nodes"]}
        assert link_id in nodes[src]["outputs"][slot]["links"] and nodes[src]["outputs"][slot]["type"] == typ
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id


def _box(node, title_bar=30):
    """A node's rectangle in the editor, title bar included: (left, top, right, bottom)."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - title_bar, x + w, y + h


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("name", NAMES)
def test_ui_layout_reads_left_to_right_at_the_default_view(name):
    """As ComfyUI's default graph: every link runs left to right; no node overlaps another; node bodies are as
    small as the editor draws them (no large empty bodies); the top-left title bar clears the editor's menu and
    workflow tabs (in frontend 1.35 at 1600x1000 a title at y=70 sat under the workflow-name bar) and side bar;
    a graph with stages has titled groups around them, clear of each other and of the other nodes."""
    ui = _load(WORKFLOWS_DIR / f"{name}.json")
    assert ui["extra"]["ds"] == {"scale": 1.0, "offset": [0, 0]}
    nodes = {n["id"]: n for n in ui["nodes"]}
    side_bar, top_bars = 60, 140
    for n in nodes.values():
        left, top, _, _ = _box(n)
        assert left >= side_bar and top >= top_bars, (n["type"], n["pos"])
    for _, src, _, dst, _, _ in ui["links"]:
        assert _box(nodes[src])[2] < _box(nodes[dst])[0], (nodes[src].get("title"), nodes[dst].get("title"))
    for a in nodes.values():
        required = NODE_CLASS_MAPPINGS[a["type"]].INPUT_TYPES()["required"]
        multiline = any(len(s) > 1 and s[1].get("multiline") for s in required.values())
        image = any(len(s) > 1 and s[1].get("image_upload") for s in required.values())
        rows = max(len(a["inputs"]), len(a["outputs"]))
        assert a["size"] == node_size(rows, len(a["widgets_values"]), multiline, image), a["type"]
        for b in nodes.values():
            assert a is b or not _overlap(_box(a), _box(b)), (a.get("title"), b.get("title"))
    groups = ui["groups"]
    if name in ("hires_fix", "step_by_step"):
        assert len(groups) >= 2
    for g in groups:
        x, y, w, h = g["bounding"]
        box = (x, y, x + w, y + h)
        inside = [n for n in nodes.values() if _overlap(box, _box(n))]
        assert inside and all(box[0] <= _box(n)[0] and _box(n)[2] <= box[2] and box[1] + 30 <= _box(n)[1]
                              and _box(n)[3] <= box[3] for n in inside), g["title"]  # wholly inside, below the title
        for other in groups:
            ox, oy, ow, oh = other["bounding"]
            assert other is g or not _overlap(box, (ox, oy, ox + ow, oy + oh)), (g["title"], other["title"])


def _check_outputs(name, out, chunks=("prompt", "workflow", "parameters")):  # parameters: A1111's infotext
    count, size = EXPECTED_FILES[name]
    files = saved_pngs(out)
    assert len(files) == count, [p.name for p in files]
    for p in files:
        with Image.open(p) as im:
            assert im.size == pixel_size(size)
            assert sorted(im.text) == sorted(chunks)
    assert leftovers(out) == []
    return files


@pytest.mark.parametrize("name", NAMES)
def test_runs_with_run_workflow(name, tmp_path_factory):
    env = tiny_env(tmp_path_factory)
    out = env.output(f"api_{name}")
    with env.settings(out):
        result = run_workflow(WORKFLOWS_DIR / f"{name}.json", overrides=TINY_OVERRIDES[name])
    files = _check_outputs(name, out)
    saved = [img["filename"] for ui in result.ui.values() for img in ui.get("images", [])
             if img["type"] == "output"]
    animations = sorted(p.name for p in out.rglob("*.webp"))  # Save Animation's files
    assert len(animations) == (name == "step_film")
    assert sorted(saved) == sorted([p.name for p in files] + animations)
    arrays = [np.asarray(Image.open(p)) for p in files]
    assert all(a.std() > 0 for a in arrays)  # not blank


@pytest.mark.parametrize("name", NAMES)
def test_runs_with_the_cli(name, tmp_path_factory):
    env = tiny_env(tmp_path_factory)
    out = env.output(f"cli_{name}")
    sets = [x for k, v in TINY_OVERRIDES[name].items() for x in ("--set", f"{k}={json.dumps(v)}")]
    with env.settings(out):
        rc = cli.main(["run", str(WORKFLOWS_DIR / "api" / f"{name}.json"), "--models", str(env.models),
                       "--output", str(out), "--device", "cpu", "--dtype", "fp32", *sets])
    assert rc == 0
    _check_outputs(name, out, chunks=("prompt", "parameters"))  # an API file carries no editor workflow


def test_same_seed_same_pixels_and_png_reruns_to_the_same_pixels(tmp_path_factory):
    env = tiny_env(tmp_path_factory)
    out = env.output("rerun")
    with env.settings(out):
        run_workflow(WORKFLOWS_DIR / "text_to_image.json", overrides=TINY_OVERRIDES["text_to_image"])
        first = saved_pngs(out)
        assert len(first) == 1
        wf = load_workflow(first[0])
        assert wf.api is not None and wf.ui is not None  # both chunks, as ComfyUI writes them
        empty = [n for n in wf.api.values() if n["class_type"] == "GlassEmptyLatent"]
        assert empty[0]["inputs"]["width"] == 64  # the prompt chunk holds the graph as it ran
        run_workflow(first[0])  # re-run the PNG itself
    files = saved_pngs(out)
    assert [p.name for p in files] == ["txt2img_00001_.png", "txt2img_00002_.png"]  # numbered, not overwritten
    a, b = (np.asarray(Image.open(p)) for p in files)
    np.testing.assert_array_equal(a, b)


def test_different_seeds_and_weightings_differ(tmp_path_factory):
    env = tiny_env(tmp_path_factory)
    out = env.output("differ")
    with env.settings(out):
        run_workflow(WORKFLOWS_DIR / "batch_of_seeds.json", overrides=TINY_OVERRIDES["batch_of_seeds"])
    arrays = [np.asarray(Image.open(p)).astype(int) for p in saved_pngs(out)]
    assert len(arrays) == 4
    assert all(np.abs(arrays[0] - a).max() > 0 for a in arrays[1:])  # each latent of the batch got its own noise


def test_interrupted_run_leaves_no_file(tmp_path_factory, monkeypatch):
    env = tiny_env(tmp_path_factory)
    out = env.output("interrupted")
    calls = []
    real = progress.ProgressBar.update_absolute

    def cancel_on_second_step(self, value, total=None, preview=None):
        calls.append(value)
        if len(calls) == 2:
            progress.request_cancel()
        return real(self, value, total, preview)

    monkeypatch.setattr(progress.ProgressBar, "update_absolute", cancel_on_second_step)
    try:
        with env.settings(out), pytest.raises((progress.Interrupted, NodeExecutionError)):
            run_workflow(WORKFLOWS_DIR / "prompt_weighting.json", overrides=TINY_OVERRIDES["prompt_weighting"])
    finally:
        progress.clear_cancel()
    assert calls, "the sampler never reported progress"
    assert saved_pngs(out) == [] and leftovers(out) == []


def test_console_script_runs_a_workflow(tmp_path_factory, tmp_path):
    """The installed `glass-diffusion` entry point, in its own process (input folder from the environment)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = tiny_env(tmp_path_factory)
    script = Path(sys.executable).with_name("glass-diffusion")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "glass_diffusion.nodes.cli"]
    sets = [x for k, v in TINY_OVERRIDES["image_to_image"].items() for x in ("--set", f"{k}={json.dumps(v)}")]
    r = subprocess.run([*cmd, "run", str(WORKFLOWS_DIR / "image_to_image.json"), "--models", str(env.models),
                        "--output", str(tmp_path), "--device", "cpu", *sets],
                       env={**os.environ, "GLASS_DIFFUSION_INPUT": str(env.input)}, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in saved_pngs(tmp_path)] == ["img2img_00001_.png"]


def test_failing_run_leaves_no_file_from_an_earlier_save(tmp_path_factory):
    env = tiny_env(tmp_path_factory)
    out = env.output("late_failure")
    bad = {**TINY_OVERRIDES["clip_skip"], "Clip Skip -2.stop_at_clip_layer": -20}  # valid widget, 2-layer model
    with env.settings(out), pytest.raises(NodeExecutionError, match="stop_at_clip_layer"):
        run_workflow(WORKFLOWS_DIR / "clip_skip.json", overrides=bad)
    assert saved_pngs(out) == [] and leftovers(out) == []


def test_failing_second_save_leaves_no_file_from_the_first(tmp_path_factory):
    """Save (-1) (node 8) stages its file, then Save (-2) (node 14) fails: the run writes nothing at all."""
    env = tiny_env(tmp_path_factory)
    out = env.output("second_save_fails")
    (out / "blocked").write_bytes(b"a file where the prefix wants a folder")  # fails only when it saves
    bad = {**TINY_OVERRIDES["clip_skip"], "Save (-2).filename_prefix": "blocked/x"}
    ex = Executor()
    with env.settings(out), pytest.raises(NodeExecutionError, match="filename_prefix") as info:
        run_workflow(WORKFLOWS_DIR / "clip_skip.json", overrides=bad, executor=ex)
    assert info.value.node_id == "14" and "8" in info.value.partial.executed
    assert info.value.partial.ui == {}  # no names of files that were never written
    assert saved_pngs(out) == [] and leftovers(out) == []
    (out / "blocked").unlink()
    # the same executor saves again on the next (good) run: the rolled-back save was not cached
    with env.settings(out):
        result = run_workflow(WORKFLOWS_DIR / "clip_skip.json", overrides=TINY_OVERRIDES["clip_skip"], executor=ex)
    assert [p.name for p in saved_pngs(out)] == ["clipskip1_00001_.png", "clipskip2_00001_.png"]
    assert {"8", "14"} <= set(result.executed)


def test_cancel_after_the_first_save_leaves_no_file(tmp_path_factory, monkeypatch):
    """Ctrl-C while the first of two saves runs: the second never starts and the first's file never appears."""
    env = tiny_env(tmp_path_factory)
    out = env.output("cancel_between_saves")
    real = image_nodes.save_images

    def save_then_cancel(*args, **kwargs):
        results = real(*args, **kwargs)
        assert leftovers(out), "the save wrote no temp file"
        progress.request_cancel()
        return results

    monkeypatch.setattr(image_nodes, "save_images", save_then_cancel)
    try:
        with env.settings(out), pytest.raises(progress.Interrupted):
            run_workflow(WORKFLOWS_DIR / "clip_skip.json", overrides=TINY_OVERRIDES["clip_skip"])
    finally:
        progress.clear_cancel()
    assert saved_pngs(out) == [] and leftovers(out) == []


def test_saving_twice_never_overwrites_and_a_run_leaves_exactly_its_files(tmp_path_factory):
    env = tiny_env(tmp_path_factory)
    out = env.output("twice")
    (out / "notes.txt").write_text("mine")
    names, contents = [], {}
    for seed in (1, 2):
        with env.settings(out):
            result = run_workflow(WORKFLOWS_DIR / "clip_skip.json",
                                  overrides={**TINY_OVERRIDES["clip_skip"], "Sampler (-1).seed": seed})
        reported = [item["filename"] for ui in result.ui.values() for item in ui["images"]]
        names += reported
        assert sorted(p.name for p in out.iterdir()) == sorted(names + ["notes.txt"])  # exactly its files
        for name in names:
            contents.setdefault(name, (out / name).read_bytes())
            assert (out / name).read_bytes() == contents[name]  # the first run's files are untouched
    assert sorted(names) == ["clipskip1_00001_.png", "clipskip1_00002_.png",
                             "clipskip2_00001_.png", "clipskip2_00002_.png"]
    assert contents["clipskip1_00001_.png"] != contents["clipskip1_00002_.png"]
    assert leftovers(out) == []


def test_cli_input_folder(tmp_path_factory, tmp_path, capsys):
    """--input names the folder image loaders read (validate and run); without it, the settings' folder. A name
    neither there nor among the shipped images is refused, naming the folder searched and --input."""
    env = tiny_env(tmp_path_factory)
    wf = str(WORKFLOWS_DIR / "image_to_image.json")
    sets = [x for k, v in TINY_OVERRIDES["image_to_image"].items() for x in ("--set", f"{k}={json.dumps(v)}")]
    empty = tmp_path / "empty"
    empty.mkdir()
    (env.input / "mine.png").write_bytes((env.input / INPUT_IMAGE).read_bytes())
    mine = ["--set", "Load Image.image=mine.png"]
    assert cli.main(["validate", wf, "--models", str(env.models), "--input", str(env.input), *mine]) == cli.OK
    assert cli.main(["validate", wf, "--models", str(env.models), "--input", str(empty), *mine]) == cli.INVALID
    err = capsys.readouterr().err
    assert "no such image file 'mine.png'" in err and str(empty) in err and "--input" in err
    out = tmp_path / "out"
    assert cli.main(["run", wf, "--models", str(env.models), "--input", str(empty), "--output", str(out),
                     "--device", "cpu", *sets, *mine]) == cli.INVALID
    assert cli.main(["run", wf, "--models", str(env.models), "--input", str(env.input), "--output", str(out),
                     "--device", "cpu", *sets]) == cli.OK
    assert [p.name for p in saved_pngs(out)] == ["img2img_00001_.png"]


# ------------------------------------------------------------------------------- on the built-in model, as shipped

BUILTIN_NAMES = [n for n in NAMES if n not in USER_FILES]  # those need a user's checkpoint (not shipped)


@pytest.fixture(scope="module")
def no_models(tmp_path_factory, request):
    """Runtime settings with EMPTY models and input folders: the built-in model and the shipped input images."""
    import contextlib

    from glass_diffusion.nodes import runtime

    models = tmp_path_factory.mktemp("empty_models")
    inputs = tmp_path_factory.mktemp("empty_input")

    @contextlib.contextmanager
    def settings(out):
        with runtime.settings_override(models_dir=models, input_dir=inputs, output_dir=out, device="cpu",
                                       dtype="auto"):
            yield
    return settings


def test_shipped_workflows_default_to_the_builtin_model():
    from glass_diffusion.sd_core import builtin
    for name in NAMES:
        api = _load(WORKFLOWS_DIR / "api" / f"{name}.json")
        loaders = [n["inputs"]["ckpt_name"] for n in api.values() if n["class_type"] == "GlassCheckpointLoader"]
        assert loaders == ([USER_FILES[name][0][1]] if name in USER_FILES else [builtin.NAME]), name
    assert "9-channel" in WORKFLOWS["inpaint_9channel"].__doc__ and INPAINT_CHECKPOINT in WORKFLOWS["inpaint_9channel"].__doc__
    assert USER_FILES["inpaint_9channel"][0][1] == INPAINT_CHECKPOINT
    assert "768-v" in WORKFLOWS["sd2_v_rescale_cfg"].__doc__ and SD2_V_CHECKPOINT in WORKFLOWS["sd2_v_rescale_cfg"].__doc__


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_runs_on_the_builtin_model_with_no_models_folder(name, no_models, tmp_path):
    """Each shipped workflow, unchanged (64 px, its own steps and cfg), on the built-in model."""
    with no_models(tmp_path):
        result = run_workflow(WORKFLOWS_DIR / f"{name}.json")
    count, size = EXPECTED_FILES[name]
    count = SHIPPED_COUNTS.get(name, count)
    files = saved_pngs(tmp_path)
    assert len(files) == count and leftovers(tmp_path) == []
    for p in files:
        with Image.open(p) as im:
            assert im.size == ((128, 128) if name == "hires_fix" else pixel_size(size))
            assert np.asarray(im).std() > 5  # a picture, not a blank
    assert {n["inputs"]["ckpt_name"] for n in result.prompt.values()
            if n["class_type"] == "GlassCheckpointLoader"} == {"glass-tiny (built-in)"}
    expected = {"text_to_image": "red", "hires_fix": "red",  # "a red circle in the center on a blue background"
                "image_to_image": "green",  # the shipped red circle on blue, towards "a large green square ..."
                "inpaint_noise_mask": "green"}  # its transparent square repainted: "a large green circle ..."
    if name in expected:
        from _scorer import analyse
        got = analyse(np.asarray(Image.open(files[0]).convert("RGB").resize((64, 64), Image.BILINEAR)))
        assert (got["colour"], got["background"], got["row"], got["col"]) == (expected[name], "blue", 1, 1), got


def test_generate_command_writes_one_png_per_prompt(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """`glass-diffusion generate`: the shipped text_to_image workflow per prompt on the built-in model, the paths
    printed; the default prompts are the model's examples; the picture follows the prompt."""
    from _scorer import analyse

    from glass_diffusion.sd_core import builtin

    monkeypatch.chdir(tmp_path)  # no models folder here
    out = tmp_path / "out"
    rc = cli.main(["generate", "a large green square at the top left on a white background", "a red circle",
                   "--seed", "3", "--steps", "12", "--cfg", "4", "--output", str(out), "--device", "cpu"])
    assert rc == cli.OK
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    files = saved_pngs(out)
    assert [p.name for p in files] == ["txt2img_00001_.png", "txt2img_00002_.png"]
    assert printed == [f'{files[0]}  seed 3  "a large green square at the top left on a white background"',
                       f'{files[1]}  seed 3  "a red circle"']  # per file: the seed and prompt it shows
    wf = load_workflow(files[0])
    sampler = [n["inputs"] for n in wf.api.values() if n["class_type"] == "GlassKSampler"][0]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (3, 12, 4.0)
    got = analyse(np.asarray(Image.open(files[0]).convert("RGB")))
    assert (got["colour"], got["background"], got["row"], got["col"]) == ("green", "white", 0, 0), got
    # no prompts: the built-in model's example prompts, 64x64
    assert cli.main(["generate", "--output", str(tmp_path / "examples"), "--steps", "4"]) == cli.OK
    examples = saved_pngs(tmp_path / "examples")
    assert len(examples) == len(builtin.EXAMPLE_PROMPTS)
    assert all(Image.open(p).size == (64, 64) for p in examples)
    # a checkpoint by path (the file's folder serves as the checkpoints folder; its .tokenizer/ beside it)
    ckpt = tiny_env(tmp_path_factory).models / "checkpoints" / CHECKPOINT
    assert cli.main(["generate", "a house", "--checkpoint", str(ckpt), "--width", "64", "--height", "64",
                     "--steps", "2", "--output", str(tmp_path / "by_path")]) == cli.OK
    assert len(saved_pngs(tmp_path / "by_path")) == 1
    # errors (exit 2): a missing checkpoint; no prompt for a model other than the built-in one
    assert cli.main(["generate", "x", "--checkpoint", "missing.safetensors", "--output", str(out)]) == cli.INVALID
    assert cli.main(["generate", "--checkpoint", str(ckpt), "--output", str(out)]) == cli.INVALID
    assert len(saved_pngs(out)) == 2

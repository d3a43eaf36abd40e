"""Regression tests for the nine faults of the hardening issue (each with its minimal reproducer), the --set /
COMBO typos of the first-run issue, and per-run state. They run on the built-in model or on dummy nodes."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import _graph_util as g
from glass_diffusion.nodes import cli, outputs, progress, runtime
from glass_diffusion.nodes.executor import (Executor, GraphValidationError, NodeExecutionError, run_workflow,
                                            validate_workflow)
from glass_diffusion.nodes.registry import NODE_CLASS_MAPPINGS
from glass_diffusion.nodes.workflow import convert_ui_to_api, load_workflow
from glass_diffusion.sd_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from glass_diffusion.sd_core.prompt import parse_weights

from _ckpt_util import tiny_model, tiny_state, write
from _nodes_util import REPO, WORKFLOWS, leftovers, rgba_image, saved_pngs, tiny_sd, write_vocabulary

API = WORKFLOWS / "api"
T2I, I2I = API / "text_to_image.json", API / "image_to_image.json"
REPO_PARENT = REPO.parent
FAST = {"Sampler.steps": 2}


@pytest.fixture
def folders(tmp_path):
    """input/ (with the shipped example picture name), output/, models/checkpoints/, and a secret outside."""
    inp, out, models = tmp_path / "input", tmp_path / "output", tmp_path / "models"
    for d in (inp, out, models / "checkpoints"):
        d.mkdir(parents=True)
    rgba_image().save(inp / "example.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rgba_image(32).save(elsewhere / "photo.png")
    with runtime.settings_override(input_dir=inp, output_dir=out, models_dir=models, device="cpu", dtype="fp32"):
        yield tmp_path


def errors(workflow, overrides=None, registry=None):
    return validate_workflow(workflow, overrides, registry)


def only(errs, kind):
    assert [e.kind for e in errs] == [kind], [str(e) for e in errs]
    return errs[0]


# ------------------------------------------------------------------ 1. input images confined to their folder

def test_1_load_image_reads_only_the_input_folder(folders):
    outside = ["../elsewhere/photo.png", "../elsewhere/missing.png", "/etc/hostname", "/nonexistent/x.png",
               str(folders / "elsewhere" / "photo.png")]  # existing and missing files alike
    messages = []
    for name in outside:
        e = only(errors(I2I, {"4.image": name}), "custom_validation_failed")
        assert e.node_id == "4" and "image" in str(e) and "input folder only" in e.message
        messages.append(e.message.replace(repr(name), "NAME"))
    assert len(set(messages)) == 1  # the same words whether the outside file exists or not: nothing revealed
    with pytest.raises(GraphValidationError):
        run_workflow(I2I, {"4.image": "../elsewhere/photo.png", **FAST})
    assert saved_pngs(folders / "output") == []


def test_1_links_inside_the_input_folder_and_annotated_names_keep_working(folders):
    (folders / "input" / "linked.png").symlink_to(folders / "elsewhere" / "photo.png")
    (folders / "input" / "sub").mkdir()
    rgba_image(48).save(folders / "input" / "sub" / "deep.png")
    rgba_image(40).save(folders / "output" / "made.png")
    for name in ("linked.png", "sub/deep.png", "made.png [output]", "example.png [input]"):
        assert errors(I2I, {"4.image": name}) == [], name
    assert only(errors(I2I, {"4.image": "../input/example.png [output]"}), "custom_validation_failed")


# ------------------------------------------------------------------ 2. resource budget at validation

@pytest.mark.parametrize("overrides, name, figure", [
    ({"5.denoise": 1e-6}, "denoise", "20,000,000 noise levels"),
    ({"5.denoise": 1e-9}, "denoise", "noise levels"),
    ({"4.width": 16384, "4.height": 16384}, "latent_image", "GB"),
    ({"4.batch_size": 4096}, "latent_image", "GB"),
    ({"4.batch_size": 4096, "5.steps": 10000}, "steps", "units of sampling work"),
    ({"4.width": 16384, "4.height": 16384, "4.batch_size": 4096, "5.steps": 10000}, None, "GB"),
])
def test_2_memory_and_time_are_refused_at_validation_with_the_figure(folders, overrides, name, figure):
    with runtime.settings_override(max_memory_gb=16):
        errs = errors(T2I, overrides)
    assert errs and all(e.kind == "resource_budget" for e in errs), [str(e) for e in errs]
    assert any(figure in e.message for e in errs)
    if name:
        assert any(e.input_name == name for e in errs)


def test_2_the_work_ceiling_is_configurable(folders):
    assert errors(T2I, {"5.steps": 10000}) == []  # the default never meets a user by accident
    with runtime.settings_override(max_work=10 ** 6):
        e = only(errors(T2I, {"5.steps": 10000}), "resource_budget")
    assert "10000 steps" in e.message and "max_work" in e.message and e.node_id == "5"


# ------------------------------------------------------------------ 3. malformed editor files

@pytest.mark.parametrize("doc, field", [
    ({"nodes": [5]}, "nodes[0]"),
    ({"nodes": [{"type": "GlassKSampler"}]}, "nodes[0].id"),
    ({"nodes": [{"id": 1}]}, "type"),
    ({"nodes": [{"id": 1, "type": "GlassEmptyLatent", "inputs": "x"}]}, "inputs"),
    ({"nodes": [{"id": 1, "type": "GlassEmptyLatent", "widgets_values": 3}]}, "widgets_values"),
    ({"nodes": [{"id": 1, "type": "GlassEmptyLatent", "inputs": [{"name": "a", "link": [1]}]}]}, "inputs[0]"),
    ({"nodes": [], "links": [[1, 2]]}, "links[0]"),
    ({"nodes": [], "links": [{"id": 1, "origin_id": None}]}, "links[0]"),
    ({"nodes": [], "links": 7}, "links"),
])
def test_3_malformed_editor_files_are_graph_errors(tmp_path, capsys, doc, field):
    with pytest.raises(GraphValidationError) as info:
        convert_ui_to_api(doc, NODE_CLASS_MAPPINGS)
    assert any(e.input_name == field for e in info.value.errors), [str(e) for e in info.value.errors]
    wf = tmp_path / "bad.json"
    wf.write_text(json.dumps(doc))
    for command in ("run", "validate", "convert"):
        assert cli.main([command, str(wf)]) == cli.INVALID
        err = capsys.readouterr().err
        assert "invalid workflow" in err and "Traceback" not in err and field in err


# ------------------------------------------------------------------ 4. recursion limits

def test_4_deeply_nested_json_is_refused_naming_the_file(tmp_path):
    wf = tmp_path / "deep.json"
    wf.write_text("[" * 1000 + "]" * 1000)
    with pytest.raises(ValueError, match="deep.json: nested deeper than 64"):
        load_workflow(wf)
    wf.write_text(json.dumps({"1": {"class_type": "x", "inputs": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}}))
    with pytest.raises(ValueError, match="nested deeper"):
        load_workflow(wf)


def test_4_a_1500_node_chain_validates_and_runs():
    g.reset()
    nodes = {"1": {"class_type": "Const", "inputs": {"value": 1}}}
    for i in range(2, 1502):
        nodes[str(i)] = {"class_type": "Add", "inputs": {"a": [str(i - 1), 0], "b": 0}}
    nodes["9999"] = {"class_type": "Sink", "inputs": {"value": ["1501", 0]}}
    result = run_workflow(nodes, registry=g.REGISTRY)
    assert result.ui["9999"] == {"values": [1]} and len(result.executed) == 1502
    nodes["1"] = {"class_type": "Add", "inputs": {"a": ["1501", 0], "b": 0}}  # a 1501-node cycle
    errs = validate_workflow(nodes, registry=g.REGISTRY)
    assert len(errs) == 1501 and {e.kind for e in errs} == {"dependency_cycle"}


def test_4_deeply_nested_prompt_is_a_node_input_error(folders):
    with pytest.raises(ValueError, match="nests brackets 10000 levels deep; at most 32"):
        parse_weights("(" * 10000 + "x" + ")" * 10000)
    with pytest.raises(NodeExecutionError) as info:
        run_workflow(T2I, {"Positive.text": "(" * 5000 + "a red circle" + ")" * 5000, **FAST})
    assert info.value.node_id == "2" and "input 'text'" in str(info.value)
    e = only(errors(T2I, {"Positive.text": "(" * 10000 + "a red circle" + ")" * 10000}), "resource_budget")
    assert e.input_name == "text" and "20,012 characters" in e.message


def test_4_a_2000_level_prefix_is_refused_at_validation(folders):
    e = only(errors(T2I, {"7.filename_prefix": "a/" * 2000 + "x"}), "custom_validation_failed")
    assert e.node_id == "7" and "subfolder levels" in e.message


# ------------------------------------------------------------------ 5. checkpoint metadata and tensors

def _resave(tmp_path, name, change_meta=None, change_state=None):
    path = save_checkpoint(tiny_model(), tmp_path / "good.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    if change_meta:
        config = json.loads(meta["glass_diffusion.config"])
        change_meta(config)
        meta["glass_diffusion.config"] = json.dumps(config)
    if change_state:
        change_state(state)
    return write(tmp_path / name, state, metadata=meta)


def test_5_metadata_values_the_shapes_decide_are_taken_from_the_shapes(tmp_path):
    path = _resave(tmp_path, "blocks.safetensors", lambda c: c["unet"].update(num_res_blocks=100000))
    t0 = time.perf_counter()
    model = load_checkpoint(path)
    assert time.perf_counter() - t0 < 60 and model.config.unet.num_res_blocks == 1


@pytest.mark.parametrize("part, name, value, words", [
    ("unet", "num_heads", 0, "unet num_heads = 0"), ("unet", "norm_groups", 7, "unet norm_groups = 7"),
    ("clip", "heads", 0, "clip heads = 0"), ("clip", "eos_token_id", 10 ** 9, "clip eos_token_id"),
    ("vae", "scaling_factor", -1.0, "vae scaling_factor"), ("vae", "norm_groups", "8", "vae norm_groups"),
    ("clip", "eps", 0, "clip eps"),
])
def test_5_bad_metadata_values_are_checkpoint_errors(tmp_path, part, name, value, words):
    path = _resave(tmp_path, "bad.safetensors", lambda c: c[part].update({name: value}))
    with pytest.raises(CheckpointError, match=words) as info:
        load_checkpoint(path)
    assert "bad.safetensors" in str(info.value)


def test_5_int8_weights_and_out_of_range_position_ids_are_checkpoint_errors(tmp_path):
    key = "model.diffusion_model.out.2.weight"
    path = _resave(tmp_path, "int8.safetensors", change_state=lambda s: s.update({key: s[key].to(torch.int8)}))
    with pytest.raises(CheckpointError, match="int8.*weights must be float") as info:
        load_checkpoint(path)
    assert key in info.value.keys
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state = tiny_state()
    state[pos] = state[pos] + 1000
    with pytest.raises(CheckpointError, match="position_ids holds positions 1000..1076, outside 0..76"):
        load_checkpoint(write(tmp_path / "pos.safetensors", state))
    state[pos] = torch.zeros(1, 0, dtype=torch.int64)
    state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(0, 32)
    with pytest.raises(CheckpointError):
        load_checkpoint(write(tmp_path / "empty.safetensors", state))


# ------------------------------------------------------------------ 6. undeclared inputs

def test_6_an_undeclared_input_is_a_validation_error():
    g.reset()
    graph = g.api(n1=("Const", {"value": 1, "zzz": ["999", 0]}), n2=("Sink", {"value": ["1", 0]}))
    e = only(validate_workflow(graph, registry=g.REGISTRY), "unknown_input")
    assert (e.node_id, e.class_type, e.input_name) == ("1", "Const", "zzz") and "its inputs: value" in e.message


# ------------------------------------------------------------------ issue 9 point 3: --set and COMBO typos

@pytest.mark.parametrize("command", ["run", "validate"])
def test_set_typo_is_an_error_naming_node_input_and_suggestion(folders, capsys, command):
    assert cli.main([command, str(T2I), "--set", "5.sed=1", "--set", "5.steps=2"]) == cli.INVALID
    err = capsys.readouterr().err
    assert "node 5 (GlassKSampler) input 'sed'" in err and "did you mean 'seed'?" in err
    assert "its inputs: unet, seed, steps" in err
    assert saved_pngs(folders / "output") == []


def test_set_unknown_node_lists_the_nodes(folders, capsys):
    assert cli.main(["validate", str(T2I), "--set", "Samplr.seed=1"]) == cli.INVALID
    err = capsys.readouterr().err
    assert "no node 'Samplr'; did you mean 'Sampler'?" in err and "5 (Sampler)" in err


def test_sampler_name_typo_lists_the_choices_and_suggests(folders, capsys):
    assert cli.main(["validate", str(T2I), "--set", "5.sampler_name=eulr"]) == cli.INVALID
    err = capsys.readouterr().err
    assert "node 5 (GlassKSampler) input 'sampler_name'" in err and "did you mean 'euler'?" in err
    assert "'dpmpp_2m'" in err and "'uni_pc_bh2'" in err  # every choice listed


# ------------------------------------------------------------------ 7. silent blank images

def _nan_checkpoint(folders, part):
    model = tiny_sd(1)
    with torch.no_grad():
        weights = model.unet if part == "unet" else model.vae.decoder  # (text to image never encodes)
        next(weights.parameters()).fill_(float("nan"))
    path = folders / "models" / "checkpoints" / f"nan_{part}.safetensors"
    save_checkpoint(model, path, dtype=torch.float32)
    write_vocabulary(path.with_name(path.stem + ".tokenizer"), model.config.clip.vocab_size)
    return path.name


@pytest.mark.parametrize("part, node, words", [("unet", "5", "step 1 of 2"), ("vae", "6", "output 0")])
def test_7_nan_weights_stop_the_run_naming_node_and_step(folders, part, node, words):
    name = _nan_checkpoint(folders, part)
    with pytest.raises(NodeExecutionError) as info:
        run_workflow(T2I, {"Checkpoint.ckpt_name": name, **FAST})
    assert info.value.node_id == node and words in str(info.value) and "not finite" in str(info.value)
    assert saved_pngs(folders / "output") == [] and leftovers(folders / "output") == []
    with runtime.settings_override(allow_nan=True):  # the debugging escape hatch
        run_workflow(T2I, {"Checkpoint.ckpt_name": name, **FAST})
    assert len(saved_pngs(folders / "output")) == 1


def test_7_900_nested_brackets_are_refused_not_a_blank_picture(folders):
    with pytest.raises(NodeExecutionError, match="nests brackets 900 levels"):
        run_workflow(T2I, {"Positive.text": "(" * 900 + "a red circle" + ")" * 900, **FAST})


# ------------------------------------------------------------------ 8. interruptions

def _cli_process(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO_PARENT), "GLASS_DIFFUSION_OUTPUT": str(tmp_path / "out")}
    return subprocess.Popen([sys.executable, "-m", "glass_diffusion.nodes.cli", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_mapping(proc, needle: str, timeout: float = 240) -> bool:
    """Wait until the process has ``needle`` mapped (a shared library, a memory-mapped checkpoint)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if needle in Path(f"/proc/{proc.pid}/maps").read_text():
                return True
        except OSError:
            pass
        time.sleep(0.01)
    return False


def _one_line(err: str) -> list:
    """stderr's lines, less the plain per-step progress lines ("GlassKSampler: step 1/5000") printed off a terminal:
    an interrupt that lands after the first step (a slow, loaded machine) must still add exactly one line."""
    return [line for line in err.splitlines() if line.strip() and not re.fullmatch(r"\S+: step \d+/\d+", line)]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see how far the process got")
@pytest.mark.parametrize("phase, delay", [("loading torch", 0.0), ("loading torch", 0.4), ("loading torch", 0.8),
                                          ("sampling", 1.0)])
def test_8_ctrl_c_at_any_time_exits_1_with_one_line(tmp_path, phase, delay):
    """Ctrl-C while torch is still being imported (at, and some time after, the moment libtorch is mapped: an
    interrupt inside torch's C++ start-up used to be swallowed, and the run went on), or while sampling."""
    proc = _cli_process(tmp_path, "run", str(T2I), "--set", "5.steps=5000", "--device", "cpu")
    needle = "libtorch_cpu" if phase == "loading torch" else "glass-tiny.safetensors"
    assert _wait_for_mapping(proc, needle), proc.communicate()
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the interrupt was lost, the run went on: {err[-500:]}")
    assert proc.returncode == 1 and "Traceback" not in err and len(_one_line(err)) == 1, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_8_a_second_ctrl_c_stops_at_once_with_one_line(capsys, tmp_path):
    class CtrlCTwice(g.Negate):
        def run(self, x):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt here
            time.sleep(1)
            return (x,)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(g.api(n1=("Const", {"value": 1}), n2=("CtrlCTwice", {"x": ["1", 0]}),
                                   n3=("Sink", {"value": ["2", 0]}))))
    assert cli.main(["run", str(wf)], {**g.REGISTRY, "CtrlCTwice": CtrlCTwice}) == 1
    assert len(_one_line(capsys.readouterr().err)) == 1


def test_8_ctrl_c_outside_a_run_is_one_line(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "default_registry", interrupted)  # Ctrl-C while the node modules load
    assert cli.main(["validate", str(T2I)]) == 1
    assert _one_line(capsys.readouterr().err) == ["interrupted"]


def test_8_stale_temp_files_of_dead_writers_are_removed_at_the_next_save(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = outputs._HOST
        stale = tmp_path / f".glass-{host}-{dead.pid}-abcd1234.png.tmp"
        kept = tmp_path / f".glass-{host}-{live.pid}-abcd1234.png.tmp"
        old_unnamed = tmp_path / ".glass-x1y2z3w4.png.tmp"
        new_unnamed = tmp_path / ".glass-q1q2q3q4.png.tmp"
        other = tmp_path / "notes.tmp"
        for p in (stale, kept, old_unnamed, new_unnamed, other):
            p.write_bytes(b"half a png")
        two_days = time.time() - 2 * 86400
        os.utime(old_unnamed, (two_days, two_days))
        with outputs.transaction() as txn:
            txn.stage(tmp_path, "Glass", 1, lambda f: f.write(b"png"), {})
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(["Glass_00001_.png", kept.name, new_unnamed.name, other.name])
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------ 9. encoding errors, prefix at validation

def test_9_a_non_utf8_byte_names_the_file(tmp_path, capsys):
    wf = tmp_path / "latin1.json"
    wf.write_bytes(T2I.read_bytes().replace(b"a red circle", b"a r\xe9d circle"))
    with pytest.raises(ValueError, match=r"latin1.json: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_workflow(wf)
    assert cli.main(["validate", str(wf)]) == cli.INVALID
    assert "latin1.json" in capsys.readouterr().err


def test_9_a_long_prefix_is_refused_before_any_work(folders, monkeypatch):
    calls = []
    monkeypatch.setattr(NODE_CLASS_MAPPINGS["GlassKSampler"], "sample", lambda *a, **k: calls.append(1))
    e = only(errors(T2I, {"7.filename_prefix": "x" * 256}), "custom_validation_failed")
    assert e.node_id == "7" and "at most" in e.message
    with pytest.raises(GraphValidationError):
        run_workflow(T2I, {"7.filename_prefix": "x" * 256})
    assert calls == []
    assert errors(T2I, {"7.filename_prefix": "x" * 200}) == []


# ------------------------------------------------------------------ per-run state (context variables)

def test_two_runs_in_two_threads_keep_their_own_settings_and_cancel_flags(tmp_path):
    seen, results = {}, {}

    class Probe(g.Sink):
        def save(self, value, **hidden):
            seen[value] = runtime.get_settings().output_dir
            if value == 1:
                progress.request_cancel()  # cancels this run only
            time.sleep(0.2)
            return {"ui": {"values": [value]}}

    reg = {**g.REGISTRY, "Probe": Probe}

    def job(value):
        with runtime.settings_override(output_dir=tmp_path / str(value)):
            try:
                results[value] = Executor(reg).run(g.api(n1=("Const", {"value": value}), n2=("Probe", {"value": ["1", 0]})))
            except progress.Interrupted:
                results[value] = "interrupted"

    threads = [threading.Thread(target=job, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {1: tmp_path / "1", 2: tmp_path / "2"}
    assert results[1] == "interrupted" and results[2].ui == {"2": {"values": [2]}}
    assert not progress.cancel_requested()

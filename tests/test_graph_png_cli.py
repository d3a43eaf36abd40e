"""PNG metadata round trip (tEXt ``prompt`` / ``workflow``) and the CLI's exit codes."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import _graph_util as g
from glass_diffusion.nodes import cli, runtime
from glass_diffusion.nodes.executor import run_workflow
from glass_diffusion.nodes.workflow import convert_ui_to_api, load_workflow

REG = g.REGISTRY
REPO_PARENT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _reset():
    g.reset()


def ui_graph(path=""):
    b = g.UIBuilder()
    b.node(3, "Seeded", [5, "fixed", "mul", 2.0, "hi"], outputs=[("INT", "INT")], title="Seed")
    b.node(7, "Sink", [path], inputs=[("value", "*")])
    b.link(3, 0, 7, 0)
    return b.build()


def write_png(path, **chunks):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, json.dumps(value))
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, pnginfo=info)
    return path


def test_png_round_trip(tmp_path):
    ui = ui_graph()
    api = convert_ui_to_api(ui, REG)
    png = write_png(tmp_path / "both.png", prompt=api, workflow=ui)
    wf = load_workflow(png)
    assert wf.api == api and wf.ui == ui
    result = run_workflow(png, registry=REG)
    assert result.ui == {"7": {"values": [10]}}
    assert g.SUNK[0][3] == {"workflow": ui}  # EXTRA_PNGINFO carries the editor workflow on
    # overrides change the embedded editor workflow too, so a saved PNG reopens as it ran
    run_workflow(png, overrides={"Seed.seed": 4}, registry=REG)
    assert g.SUNK[1][0] == 8 and g.SUNK[1][3]["workflow"]["nodes"][0]["widgets_values"] == [4, "fixed", "mul", 2.0, "hi"]
    assert ui["nodes"][0]["widgets_values"][0] == 5  # the caller's graph is untouched


def test_png_with_only_one_chunk(tmp_path):
    ui = ui_graph()
    only_ui = write_png(tmp_path / "ui.png", workflow=ui)
    assert run_workflow(only_ui, registry=REG).ui == {"7": {"values": [10]}}
    only_api = write_png(tmp_path / "api.png", prompt=convert_ui_to_api(ui, REG))
    assert run_workflow(only_api, overrides={"3.seed": 1}, registry=REG).ui == {"7": {"values": [2]}}
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no 'prompt' or 'workflow'"):
        load_workflow(tmp_path / "plain.png")


def test_cli_run_validate_exit_codes(tmp_path, capsys):
    out = tmp_path / "value.txt"
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(ui_graph(str(out))))
    assert cli.main(["run", str(wf)], REG) == 0
    assert out.read_text() == "10"
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"node": "7", "class_type": "Sink",
                                                                    "ui": {"values": [10]}}
    assert cli.main(["run", str(wf), "--set", "Seed.seed=4", "--set", "3.mode=\"add\""], REG) == 0
    assert out.read_text() == "6"
    assert cli.main(["validate", str(wf)], REG) == 0
    assert cli.main(["validate", str(wf), "--set", "3.mode=pow"], REG) == 2  # not JSON: the string "pow"
    err = capsys.readouterr().err
    assert "node 3 (Seeded) input 'mode'" in err and "'pow'" in err
    assert cli.main(["run", str(wf), "--set", "3.scale=-1"], REG) == 2
    assert cli.main(["run", str(wf), "--set", "nope"], REG) == 2
    assert cli.main(["run", str(wf), "--set", "99.seed=1"], REG) == 2
    assert cli.main(["run", str(tmp_path / "missing.json")], REG) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["validate", str(tmp_path / "bad.json")], REG) == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(wf), "--device", "tpu"], REG)
    assert info.value.code == 2


def test_cli_failed_run_is_exit_1(tmp_path, capsys):
    wf = tmp_path / "fail.json"
    wf.write_text(json.dumps(g.api(n1=("Const", {"value": 1}), n2=("Fails", {"x": ["1", 0]}),
                                   n3=("Sink", {"value": ["2", 0]}))))
    assert cli.main(["run", str(wf)], REG) == 1
    assert "node 2 (Fails) failed: ValueError: boom 1" in capsys.readouterr().err
    wf.write_text(json.dumps(g.api(n1=("Const", {"value": 1}), n2=("Cancel", {"x": ["1", 0]}),
                                   n3=("Sink", {"value": ["2", 0]}))))
    assert cli.main(["run", str(wf)], REG) == 1
    assert "interrupted" in capsys.readouterr().err


def test_cli_first_ctrl_c_cancels_at_the_next_step(tmp_path, capsys):
    class CtrlC(g.Negate):
        def run(self, x):
            os.kill(os.getpid(), signal.SIGINT)  # what a terminal's Ctrl-C sends
            return (x,)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(g.api(n1=("Const", {"value": 1}), n2=("CtrlC", {"x": ["1", 0]}),
                                   n3=("Negate", {"x": ["2", 0]}), n4=("Sink", {"value": ["3", 0]}))))
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["run", str(wf)], {**REG, "CtrlC": CtrlC}) == 1
    assert "cancelling at the next step" in capsys.readouterr().err
    assert g.CALLS["Negate"] == 0 and signal.getsignal(signal.SIGINT) is before


def test_cli_passes_runtime_settings(tmp_path):
    seen = []

    class Probe(g.Sink):
        def save(self, value, **hidden):
            seen.append(runtime.get_settings())
            return {}
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(g.api(n1=("Const", {"value": 1}), n2=("Probe", {"value": ["1", 0]}))))
    before = runtime.get_settings()
    argv = ["run", str(wf), "--models", str(tmp_path / "m"), "--output", str(tmp_path / "o"),
            "--device", "cpu", "--dtype", "bf16"]
    assert cli.main(argv, {**REG, "Probe": Probe}) == 0
    s = seen[0]
    assert (s.models_dir, s.output_dir, s.device, s.dtype) == (tmp_path / "m", tmp_path / "o", "cpu", "bf16")
    assert str(s.torch_dtype()) == "torch.bfloat16" and s.torch_device().type == "cpu"
    assert runtime.get_settings() == before  # restored after the run


def test_cli_convert_and_nodes(tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(ui_graph()))
    out = tmp_path / "api.json"
    assert cli.main(["convert", str(wf), "-o", str(out)], REG) == 0
    api = json.loads(out.read_text())
    assert api["3"]["inputs"] == {"seed": 5, "mode": "mul", "scale": 2.0, "note": "hi"}
    assert cli.main(["run", str(out)], REG) == 0  # the converted file runs as is
    unknown = ui_graph()
    unknown["nodes"][0]["type"] = "Mystery"
    wf.write_text(json.dumps(unknown))
    assert cli.main(["convert", str(wf)], REG) == 2
    capsys.readouterr()
    assert cli.main(["nodes"], REG) == 0
    text = capsys.readouterr().out
    assert "Seeded" in text and "mode: COMBO ['add', 'mul']" in text and "Sink  [output]" in text
    assert cli.main(["nodes", "--json"], REG) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["Const"]["inputs"]["value"] == {"type": "INT", "required": True, "default": 1, "min": -100, "max": 100}


def test_cli_as_a_process_rejects_bad_arguments():
    env = {**os.environ, "PYTHONPATH": str(REPO_PARENT)}
    proc = subprocess.run([sys.executable, "-m", "glass_diffusion.nodes.cli", "frobnicate"],
                          capture_output=True, env=env, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr

"""`glass-diffusion grid` here, without Ray: axis values, the 2 x 4 glass-tiny grid against single runs, the
labelled picture, reuse across cells, resume after an interrupt, and the grid folder's rules."""
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import _grid_util as gu
from glass_diffusion.nodes import grid_image, progress
from glass_diffusion.nodes.grid import Axis, GridError, GridSpec, parse_axis, parse_values, run_grid
from glass_diffusion.nodes.workflow import load_workflow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: far faster on a busy 2-core machine. The grid and the reference runs all use it
    (CPU results can differ in the last bit between thread counts; the grid passes its count on to Ray)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- axis values

def test_axis_values(tmp_path):
    assert parse_values("1,2, 3") == [1, 2, 3]
    assert parse_values("euler, ddim") == ["euler", "ddim"]
    assert parse_values('["a, b", "c"]') == ["a, b", "c"]
    assert parse_values("1..4") == [1, 2, 3, 4]
    assert parse_values("4..1") == [4, 3, 2, 1]
    assert parse_values("0..10:5") == [0, 5, 10]
    assert parse_values("1..2:0.25") == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert parse_values("0.1..0.3:0.1") == [0.1, 0.2, 0.3]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# prompts\na red circle, large\n\n7\n  a blue square  \n", encoding="utf-8")
    assert parse_values(f"@{prompts}") == ["a red circle, large", 7, "a blue square"]
    axis = parse_axis("y", f"Positive.text=@{prompts}")
    assert axis.key == "Positive.text" and axis.labels == ["a red circle, large", "7", "a blue square"]
    for bad, words in [("Sampler.seed", "NODE.INPUT=VALUES"), ("seed=1,2", "NODE.INPUT=VALUES"),
                       ("Sampler.seed=1,1", "given twice"), ("Sampler.seed=1..4:-1", "no values"),
                       ("Sampler.seed=@/no/such/file", "cannot read"), ("Sampler.seed=[1,", "not a JSON list")]:
        with pytest.raises(GridError, match=words):
            parse_axis("x", bad)


def test_spec_errors_name_the_axis():
    wf = load_workflow(gu.WORKFLOW)
    with pytest.raises(GridError, match=r"--x Nope.seed: no node 'Nope'"):
        GridSpec(wf, [Axis("x", "Nope.seed", (1, 2))])
    with pytest.raises(GridError, match=r"--y Sampler.sed: node 5 \(GlassKSampler\) has no input 'sed'.*seed"):
        GridSpec(wf, [Axis("x", "Sampler.seed", (1,)), Axis("y", "Sampler.sed", (1,))])
    with pytest.raises(GridError, match="same input"):
        GridSpec(wf, [Axis("x", "Sampler.seed", (1,)), Axis("y", "Sampler.seed", (2,))])
    with pytest.raises(GridError, match="x axis"):
        GridSpec(wf, [Axis("y", "Sampler.seed", (1,))])


def test_a_bad_cell_fails_before_any_cell_runs(tmp_path):
    spec = GridSpec(load_workflow(gu.WORKFLOW), [Axis("x", "Sampler.steps", (2, 0))])
    with pytest.raises(GridError, match=r"cell x1 \(Sampler.steps=0\) is not a valid graph"):
        run_grid(spec, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no grid folder, no cell


def test_run_order_varies_the_cheapest_axis_fastest():
    spec = GridSpec(load_workflow(gu.WORKFLOW), [Axis("x", "Positive.text", ("a", "b")),
                                                 Axis("y", "Sampler.seed", (1, 2, 3))])
    # the seed feeds 3 nodes (sampler, decode, save), the prompt 4: seeds vary fastest although seed is y
    assert [c.name for c in spec.run_order()][:3] == ["x0_y0", "x0_y1", "x0_y2"]
    assert [c.name for c in spec.cells()][:3] == ["x0_y0", "x1_y0", "x0_y1"]


# ----------------------------------------------------------------------------- the 2 x 4 grid

@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    """The 2 x 4 grid through the CLI (prompts from a text file), and the single-run reference."""
    root = tmp_path_factory.mktemp("grid")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(gu.PROMPTS) + "\n", encoding="utf-8")
    rc, out, err = gu.cli_main(["grid", gu.WORKFLOW, "--x", "Sampler.seed=11..14", "--y", f"Positive.text=@{prompts}",
                                "--set", f"Sampler.steps={gu.STEPS}", "--output", root / "out"])
    assert rc == 0, err
    [grid_png] = out.split()
    return {"grid": grid_png, "err": err, "reference": gu.reference(root / "ref")}


def test_every_cell_is_bitwise_a_single_run(local_grid):
    from pathlib import Path
    folder = Path(local_grid["grid"]).parent
    cells = gu.cell_images(folder)
    assert sorted(cells) == sorted(local_grid["reference"]) and len(cells) == 8
    for name, files in cells.items():
        assert files == [local_grid["reference"][name]], name  # one file, the same bytes (pixels and metadata)
        record = json.loads((folder / "cells" / name / "cell.json").read_text())
        xi, yi = int(name[1]), int(name[4])
        assert record["overrides"] == {"Sampler.steps": gu.STEPS, "Sampler.seed": gu.SEEDS[xi],
                                       "Positive.text": gu.PROMPTS[yi]}
        with Image.open(folder / "cells" / name / record["image"]) as im:
            graph = json.loads(im.text["prompt"])  # the cell's own workflow, as it ran
        assert graph["5"]["inputs"]["seed"] == gu.SEEDS[xi] and graph["2"]["inputs"]["text"] == gu.PROMPTS[yi]
    # different seeds and prompts give different pictures (the grid really varied the inputs)
    assert len({gu.pixels(f[0]).tobytes() for f in cells.values()}) == 8


def test_text_encodings_are_reused_across_cells(local_grid):
    # 8 cells, 2 prompts: 2 positive encodings + 1 negative; the checkpoint loaded once
    assert "node runs: GlassCheckpointLoader 1, GlassEmptyLatent 1, GlassKSampler 8, GlassSaveImage 8, " \
           "GlassTextEncode 3, GlassVAEDecode 8" in local_grid["err"]
    assert "grid: 8/8 cells" in local_grid["err"] and "left" in local_grid["err"]  # progress lines


def test_grid_picture_has_the_labels_and_the_cells(local_grid):
    ref = {name: Image.fromarray(gu.pixels(data)) for name, data in local_grid["reference"].items()}
    images = {(int(n[1]), int(n[4])): im for n, im in ref.items()}
    x_labels, y_labels = [str(s) for s in gu.SEEDS], gu.PROMPTS
    title = "x: Sampler.seed   y: Positive.text"
    with Image.open(local_grid["grid"]) as im:
        got = np.array(im.convert("RGB"))
        meta = json.loads(im.text["glass_grid"])
    # the whole picture equals one drawn from the single runs' images
    assert np.array_equal(got, np.array(grid_image.render_grid(images, x_labels, y_labels, title)))
    layout = grid_image.grid_layout((64, 64), x_labels, y_labels, title)
    crop = lambda box: got[box.y:box.y + box.h, box.x:box.x + box.w]  # noqa: E731
    for (xi, yi), box in layout.cells.items():  # each cell: its image, scaled by a whole factor
        up = np.array(images[(xi, yi)]).repeat(layout.scale, 0).repeat(layout.scale, 1)
        assert np.array_equal(crop(box), up)
    drawn = []
    for box, text in [(layout.title, title), *zip(layout.x_labels, x_labels, strict=True),
                      *zip(layout.y_labels, y_labels, strict=True)]:
        part = crop(box)
        assert np.array_equal(part, np.array(grid_image.render_label(text, (box.w, box.h)))), text
        assert (part < 128).any(), f"label {text!r} has no ink"
        drawn.append(part.tobytes())
    assert len(set(drawn)) == len(drawn)  # every label differs
    assert meta["axes"][0]["values"] == gu.SEEDS and len(meta["cell_images"]) == 8


def test_a_complete_grid_run_again_runs_nothing(local_grid):
    from pathlib import Path
    before = Path(local_grid["grid"]).read_bytes()
    rc, out, err = gu.cli_main(["grid", gu.WORKFLOW, "--x", "Sampler.seed=11..14", "--y",
                                "Positive.text=" + json.dumps(gu.PROMPTS), "--set", f"Sampler.steps={gu.STEPS}",
                                "--output", Path(local_grid["grid"]).parents[1]])
    assert rc == 0 and out.split() == [local_grid["grid"]], err
    assert "8 already saved, 0 run" in err and Path(local_grid["grid"]).read_bytes() == before


# ----------------------------------------------------------------------------- interrupt and resume

def test_interrupted_grid_resumes_to_the_same_grid(local_grid, tmp_path):
    from pathlib import Path
    spec = gu.spec()
    seen = []

    def stop_after_three(p):
        seen.append(p.record["cell"])
        if p.done == 3:
            progress.request_cancel()  # what the CLI's first Ctrl-C does

    first = run_grid(spec, tmp_path, name="g", on_cell=stop_after_three)
    progress.clear_cancel()
    assert not first.complete and first.ran == 3 and first.grids == []
    assert not (tmp_path / "g" / "grid.png").exists()  # a partial grid is never written
    assert sorted(p.name for p in (tmp_path / "g" / "cells").iterdir()) == sorted(seen)
    # a process killed while filling a cell leaves only a .partial folder; it is not taken for a saved cell
    dead = tmp_path / "g" / ".partial" / "x3_y1.deadbeef"
    dead.mkdir()
    (dead / "txt2img_00001_.png").write_bytes(b"half a file")
    second = run_grid(spec, tmp_path, name="g")
    assert second.complete and second.resumed == 3 and second.ran == 5 and not dead.exists()
    assert (tmp_path / "g" / "grid.png").read_bytes() == Path(local_grid["grid"]).read_bytes()
    assert gu.cell_images(tmp_path / "g") == {k: [v] for k, v in local_grid["reference"].items()}
    assert second.node_runs()["GlassKSampler"] == 5  # the saved cells were not run again


def test_ctrl_c_during_a_cell_leaves_that_cell_out_and_the_command_resumes(tmp_path, monkeypatch):
    from glass_diffusion.nodes import grid as grid_mod
    real_cell, real_update = grid_mod.run_cell, progress.ProgressBar.update_absolute
    calls = []

    def run_cell(executor, workflow, cell, out_dir):
        calls.append(cell.name)
        return real_cell(executor, workflow, cell, out_dir)

    def update_absolute(self, *args, **kwargs):
        if len(calls) == 2 and not sent:  # Ctrl-C in the middle of the second cell's sampling
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return real_update(self, *args, **kwargs)

    sent = []
    monkeypatch.setattr(grid_mod, "run_cell", run_cell)
    monkeypatch.setattr(progress.ProgressBar, "update_absolute", update_absolute)
    argv = ["grid", gu.WORKFLOW, "--x", "Sampler.seed=1,2,3", "--set", "Sampler.steps=2", "--output", tmp_path,
            "--name", "g"]
    rc, out, err = gu.cli_main(argv)
    assert rc == 1 and out == "" and "cancelling at the next step" in err
    assert f"run the same command again to resume ({tmp_path / 'g'})" in err
    assert calls == ["x0", "x1"] and [p.name for p in (tmp_path / "g" / "cells").iterdir()] == ["x0"]
    assert list((tmp_path / "g" / ".partial").iterdir()) == [] and not (tmp_path / "g" / "grid.png").exists()
    rc, out, err = gu.cli_main(argv)
    assert rc == 0 and out.split() == [str(tmp_path / "g" / "grid.png")] and "1 already saved, 2 run" in err
    assert calls == ["x0", "x1", "x1", "x2"]


def test_another_grid_in_the_same_folder_is_refused(tmp_path):
    run_grid(GridSpec(load_workflow(gu.WORKFLOW), [Axis("x", "Sampler.seed", (1,))], {"Sampler.steps": 1}),
             tmp_path, name="g")
    with pytest.raises(GridError, match="holds another grid"):
        run_grid(GridSpec(load_workflow(gu.WORKFLOW), [Axis("x", "Sampler.seed", (2,))], {"Sampler.steps": 1}),
                 tmp_path, name="g")


def test_one_grid_per_z_value(tmp_path):
    rc, out, err = gu.cli_main(["grid", gu.WORKFLOW, "--x", "Sampler.seed=1,2", "--z", "Sampler.cfg=1,3",
                                "--set", "Sampler.steps=1", "--output", tmp_path, "--name", "z"])
    assert rc == 0, err
    paths = out.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["grid_z0.png", "grid_z1.png"]
    titles = []
    for k, path in enumerate(paths):
        with Image.open(path) as im:
            got = np.array(im.convert("RGB"))
            assert json.loads(im.text["glass_grid"])["z_index"] == k
        title = f"x: Sampler.seed   z: Sampler.cfg = {[1, 3][k]}"
        box = grid_image.grid_layout((64, 64), ["1", "2"], [""], title).title
        assert np.array_equal(got[box.y:box.y + box.h, box.x:box.x + box.w],
                              np.array(grid_image.render_label(title, (box.w, box.h))))
        titles.append(got[:box.h].tobytes())
    assert titles[0] != titles[1]


def test_ray_flag_without_ray_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    rc, out, err = gu.cli_main(["grid", gu.WORKFLOW, "--x", "Sampler.seed=1,2", "--ray", "--output", tmp_path])
    assert rc == 2 and "pip install 'glass-diffusion[ray]'" in err
    assert not any(tmp_path.iterdir())

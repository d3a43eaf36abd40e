"""Shared pieces of the grid tests: the 2 x 4 glass-tiny grid (4 seeds x 2 prompts) and its reference, each
cell made by a plain ``glass-diffusion run`` (computed once per test process)."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from glass_diffusion.nodes import cli
from glass_diffusion.nodes.example_workflows import WORKFLOWS_DIR
from glass_diffusion.nodes.grid import Axis, GridSpec
from glass_diffusion.nodes.workflow import load_workflow

WORKFLOW = WORKFLOWS_DIR / "api" / "text_to_image.json"
SEEDS = [11, 12, 13, 14]
PROMPTS = ["a red circle in the center on a blue background",
           "a small yellow triangle at the top left on a black background"]
STEPS = 4  # keeps the cells cheap; the grid code does not care
BASE = {"Sampler.steps": STEPS}


def spec(seeds=SEEDS, prompts=PROMPTS) -> GridSpec:
    return GridSpec(load_workflow(WORKFLOW), [Axis("x", "Sampler.seed", tuple(seeds)),
                                              Axis("y", "Positive.text", tuple(prompts))], dict(BASE))


def cli_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


_REFERENCE = {}


def reference(root: Path) -> dict:
    """{cell name: PNG bytes} for the 2 x 4 grid, each from its own `glass-diffusion run` (a fresh process
    state: new Executor, model loaded again)."""
    if not _REFERENCE:
        for yi, prompt in enumerate(PROMPTS):
            for xi, seed in enumerate(SEEDS):
                out = Path(root) / f"x{xi}_y{yi}"
                rc, stdout, err = cli_main(["run", WORKFLOW, "--set", f"Sampler.seed={seed}", "--set",
                                            f"Positive.text={prompt}", "--set", f"Sampler.steps={STEPS}",
                                            "--output", out])
                assert rc == 0, err
                [name] = [e["filename"] for line in stdout.splitlines() for e in json.loads(line)["ui"]["images"]]
                _REFERENCE[f"x{xi}_y{yi}"] = (out / name).read_bytes()
    return _REFERENCE


def pixels(data_or_path) -> np.ndarray:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        return np.array(im.convert("RGB"))


def cell_images(folder: Path) -> dict:
    """{cell name: [bytes of every file the cell saved, except cell.json]}."""
    out = {}
    for cell_dir in sorted((Path(folder) / "cells").iterdir()):
        out[cell_dir.name] = [p.read_bytes() for p in sorted(cell_dir.rglob("*")) if p.is_file()
                              and p.name != "cell.json"]
    return out

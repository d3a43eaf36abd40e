"""Grids: one workflow run over the product of up to three axes of input values (no SD knowledge here).

    glass-diffusion grid WORKFLOW --x NODE.INPUT=VALUES [--y ...] [--z ...] [--set NODE.INPUT=VALUE ...]
                                  [--name NAME] [--output DIR] [--ray [ADDRESS]] ...

VALUES: ``1,2,3`` (each item JSON when it parses, else a string), a JSON list ``["a, b", "c"]``, an inclusive
range ``1..8`` or ``0.5..2:0.5``, or ``@FILE``: one value per line (prompts; blank and '#' lines skipped).

Every cell is one ordinary run of the workflow through the executor (nodes/executor.py) with the cell's values
as overrides, so each saved image carries its own graph as metadata and equals a plain ``glass-diffusion run``
of that cell. Locally one Executor serves every cell, and cells run in the order that keeps its cache useful:
the axis whose node has the fewest downstream nodes varies fastest (a seed before a prompt), so the nodes that
a run of cells shares (a loaded checkpoint, a text encoding) run once.

A grid lives in one folder, ``<output>/<name>/`` (default name ``grid_<workflow>_<fingerprint>``: the same
command finds its folder again): ``grid.json`` (what the grid is), ``cells/<cell>/`` (the files the cell's
run saved, with ``cell.json``), and once every cell is there ``grid.png`` (``grid_z<k>.png``: one per z value).
Rules: a cell folder appears whole or not at all (it is filled in ``.partial/`` and renamed); a grid picture
is written only when every cell is there; nothing is overwritten; a second run of the same command (after
Ctrl-C, a crash or a killed machine) skips the cells already saved. One process works on a grid folder.
With ``--ray`` the cells run on a Ray cluster (nodes/grid_ray.py); the driver writes every file.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import outputs, progress, runtime
from .validation import links_of
from .workflow import Workflow, apply_overrides, find_node, input_specs, load_workflow, parse_value, to_api

AXES = ("x", "y", "z")
CELLS_PER_TASK = 4  # Ray: cells run as one task, on one actor, in order
MAX_CELLS = 100_000


class GridError(ValueError):
    """A grid that cannot run as given (bad axis, other grid in the folder, ...)."""


# ----------------------------------------------------------------------------- axes and cells

_NUM = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^({_NUM})\.\.({_NUM})(?::({_NUM}))?$")


def parse_values(text: str, where: str = "") -> list:
    """The values of an axis: ``a,b,c``, a JSON list, ``START..STOP[:STEP]`` (inclusive), or ``@FILE``."""
    text = text.strip()
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except OSError as e:
            raise GridError(f"{where}cannot read the values file {path}: {e.strerror or e}") from None
        values = [_file_value(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    elif text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise GridError(f"{where}{text!r} is not a JSON list ({e})") from None
        if not isinstance(values, list):
            raise GridError(f"{where}{text!r} is not a JSON list")
    elif (m := _RANGE.match(text)):
        values = _range(*m.groups(), where=where)
    else:
        values = [parse_value(item.strip()) for item in text.split(",")]
    if not values:
        raise GridError(f"{where}no values")
    return values


def _file_value(line: str):
    """A line of a values file: a number when it is one, else the text as it is (prompts stay strings)."""
    value = parse_value(line)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else line


def _range(start: str, stop: str, step: str | None, where: str) -> list:
    whole = all(s is None or re.fullmatch(r"-?\d+", s) for s in (start, stop, step))
    a, b = (int(start), int(stop)) if whole else (float(start), float(stop))
    d = (int(step) if whole else float(step)) if step is not None else (1 if b >= a else -1)
    if d == 0 or (b - a) * d < 0:
        raise GridError(f"{where}range {start}..{stop}{':' + step if step else ''} has no values in that direction")
    n = int(math.floor((b - a) / d + 1e-9)) + 1
    if n > MAX_CELLS:
        raise GridError(f"{where}range of {n} values is too long")
    return [a + i * d if whole else round(a + i * d, 10) for i in range(n)]


def label(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Axis:
    name: str       # "x" | "y" | "z"
    key: str        # NODE.INPUT as given
    values: tuple

    @property
    def labels(self) -> list[str]:
        return [label(v) for v in self.values]


def parse_axis(name: str, text: str) -> Axis:
    """``--x NODE.INPUT=VALUES`` -> Axis."""
    key, sep, values = text.partition("=")
    key = key.strip()
    ref, dot, inp = key.rpartition(".")
    if not sep or not dot or not ref or not inp:
        raise GridError(f"--{name} {text!r}: expected NODE.INPUT=VALUES")
    vals = parse_values(values, where=f"--{name} {key}: ")
    seen = set()
    for v in vals:
        if json.dumps(v, sort_keys=True) in seen:
            raise GridError(f"--{name} {key}: the value {label(v)!r} is given twice")
        seen.add(json.dumps(v, sort_keys=True))
    return Axis(name, key, tuple(vals))


@dataclass(frozen=True)
class Cell:
    index: tuple      # one value index per axis of the grid, in axis order
    overrides: dict   # {NODE.INPUT: value}: the grid's shared overrides and this cell's values
    axes: tuple = AXES  # the grid's axis names ("x", "y", "z" or a part of them)

    @property
    def name(self) -> str:
        return "_".join(f"{a}{i}" for a, i in zip(self.axes, self.index, strict=True))

    def at(self, axis: str) -> int:
        """The value index on an axis; 0 for an axis the grid does not have."""
        return self.index[self.axes.index(axis)] if axis in self.axes else 0


@dataclass
class GridSpec:
    """A workflow, overrides shared by every cell, and 1 to 3 axes."""
    workflow: Workflow
    axes: list[Axis]
    overrides: dict = field(default_factory=dict)
    registry: dict | None = None

    def __post_init__(self):
        names = [a.name for a in self.axes]
        if not names or names[0] != "x" or names != [a for a in AXES if a in names]:
            raise GridError("a grid has an x axis, and optionally y and z")
        keys = [a.key for a in self.axes]
        if len(set(keys)) != len(keys):
            raise GridError(f"two axes set the same input {keys}")
        self.registry = _default_registry() if self.registry is None else self.registry
        api, _ = to_api(self.workflow, self.registry)
        try:
            apply_overrides(api, self.overrides)
        except KeyError as e:
            raise GridError(f"--set: {e.args[0]}") from None
        self.api = api  # the graph every cell starts from
        self.nodes = {a.name: self._node_of(a, api) for a in self.axes}
        if math.prod(len(a.values) for a in self.axes) > MAX_CELLS:
            raise GridError(f"more than {MAX_CELLS} cells")

    def _node_of(self, axis: Axis, api: dict) -> str:
        ref, _, inp = axis.key.rpartition(".")
        try:
            nid = find_node(api, ref)
        except KeyError as e:
            raise GridError(f"--{axis.name} {axis.key}: {e.args[0]}") from None
        cls = self.registry.get(api[nid]["class_type"])
        if cls is not None:
            names = [n for n, s in input_specs(cls).items() if s.category != "hidden"]
            if inp not in names:
                raise GridError(f"--{axis.name} {axis.key}: node {nid} ({api[nid]['class_type']}) has no input "
                                f"{inp!r}; its inputs: {', '.join(names)}")
        return nid

    def cells(self) -> list[Cell]:
        """Every cell, x fastest (the grid's reading order)."""
        ranges = [range(len(a.values)) for a in reversed(self.axes)]
        names = tuple(a.name for a in self.axes)
        out = []
        for rev in itertools.product(*ranges):
            index = tuple(reversed(rev))
            overrides = {**self.overrides, **{a.key: a.values[i] for a, i in zip(self.axes, index, strict=True)}}
            out.append(Cell(index, overrides, names))
        return out

    def axis_order(self) -> list[int]:
        """Axis positions from slowest to fastest in the run order: the axis whose node has the fewest
        downstream nodes varies fastest (ties: x faster than y faster than z)."""
        cost = [len(_downstream(self.api, self.nodes[a.name])) for a in self.axes]
        return sorted(range(len(self.axes)), key=lambda k: (-cost[k], -k))

    def run_order(self) -> list[Cell]:
        """The cells in the order that reuses the executor's cache most (see axis_order)."""
        slow_to_fast = self.axis_order()
        return sorted(self.cells(), key=lambda c: tuple(c.index[k] for k in slow_to_fast))

    def fingerprint(self) -> str:
        text = json.dumps({"api": self.api, "axes": [[a.name, a.key, list(a.values)] for a in self.axes]},
                          sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> dict:
        return {"format": 1, "workflow": self.workflow.source, "fingerprint": self.fingerprint(),
                "overrides": self.overrides, "cells": len(self.cells()),
                "axes": [{"axis": a.name, "key": a.key, "values": list(a.values)} for a in self.axes]}


def _default_registry():
    from .workflow import default_registry
    return default_registry()


def _downstream(api: dict, nid: str) -> set:
    """Nodes whose inputs depend on nid (nid included)."""
    users: dict[str, list] = {}
    for other, node in api.items():
        for _, src in links_of(node):
            users.setdefault(src, []).append(other)
    seen, todo = {nid}, [nid]
    while todo:
        for u in users.get(todo.pop(), []):
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def task_groups(spec: GridSpec, cells: Iterable[Cell], size: int = CELLS_PER_TASK) -> list[list[Cell]]:
    """Runs of consecutive cells (run order) that differ only in the fastest axis, cut to ``size``: one Ray
    task each, so an actor's cache serves the cells of a task as the local run's does."""
    order, fastest = spec.run_order(), spec.axis_order()[-1]
    wanted = {c.name for c in cells}
    groups: list[list[Cell]] = []
    for _, run in itertools.groupby((c for c in order if c.name in wanted),
                                    key=lambda c: tuple(i for k, i in enumerate(c.index) if k != fastest)):
        run = list(run)
        groups.extend(run[i:i + size] for i in range(0, len(run), size))
    return groups


# ----------------------------------------------------------------------------- one cell

def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_cell(executor, workflow: Workflow, cell: Cell, out_dir: Path) -> dict:
    """Run one cell into the (empty) folder out_dir; returns its record (files relative to out_dir)."""
    from .executor import run_workflow
    t0 = time.perf_counter()
    with runtime.settings_override(output_dir=out_dir):
        result = run_workflow(workflow, cell.overrides, registry=executor.registry, executor=executor)
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    shown = [f"{e['subfolder']}/{e['filename']}".lstrip("/") for ui in result.ui.values()
             for e in ui.get("images", []) if e.get("type") == "output" and e.get("filename")]
    image = next((f for f in shown if f in files), None) or next((f for f in files if f.endswith(".png")), None)
    if image is None:
        raise GridError(f"cell {cell.name}: the workflow saved no image (a grid needs an output node that "
                        f"saves one, such as Save Image)")
    return {"cell": cell.name, "index": list(cell.index), "axes": list(cell.axes), "overrides": cell.overrides,
            "files": files,
            "image": image, "executed": [result.prompt[n]["class_type"] for n in result.executed],
            "seconds": round(time.perf_counter() - t0, 3), "worker": worker_name()}


# ----------------------------------------------------------------------------- the grid folder

class GridFolder:
    """``<root>/grid.json``, ``cells/<cell>/`` (whole or absent), ``.partial/`` (being filled), grid PNGs."""

    def __init__(self, root: Path, spec: GridSpec):
        self.root, self.spec = Path(root), spec
        self.cells_dir, self.partial_dir = self.root / "cells", self.root / ".partial"

    def open(self) -> "GridFolder":
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(exist_ok=True)
        self._lock()
        for leftover in self.partial_dir.iterdir():  # a run that died while filling a cell
            shutil.rmtree(leftover, ignore_errors=True)
        wanted = self.spec.describe()
        manifest = self.root / "grid.json"
        if manifest.exists():
            have = json.loads(manifest.read_text(encoding="utf-8"))
            if have.get("fingerprint") != wanted["fingerprint"]:
                raise GridError(f"{self.root} holds another grid (workflow {have.get('workflow')!r}, axes "
                                f"{[a.get('key') for a in have.get('axes', [])]}); choose another --name")
        else:
            _publish(manifest, (json.dumps(wanted, indent=2, default=repr) + "\n").encode())
        return self

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows): one process per grid folder is on the user
            return
        self._lock_file = open(self.root / ".lock", "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise GridError(f"another process is working on the grid {self.root}") from None

    def close(self) -> None:
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()
            self._lock_file = None

    def done(self) -> dict[str, dict]:
        """Records of the cells already saved."""
        out = {}
        for cell in self.spec.cells():
            record_path = self.cells_dir / cell.name / "cell.json"
            if record_path.is_file():
                out[cell.name] = json.loads(record_path.read_text(encoding="utf-8"))
        return out

    def new_partial(self, cell: Cell) -> Path:
        path = self.partial_dir / f"{cell.name}.{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def commit(self, partial: Path, record: dict) -> bool:
        """Give a filled cell folder its final name; False (and the copy removed) if the cell is there already."""
        (partial / "cell.json").write_text(json.dumps(record, indent=2, default=repr) + "\n", encoding="utf-8")
        final = self.cells_dir / record["cell"]
        try:
            if final.exists():
                raise FileExistsError(final)
            os.rename(partial, final)  # a non-empty existing folder is never replaced
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            if (final / "cell.json").is_file():
                return False
            raise
        return True

    def grid_paths(self) -> list[Path]:
        z = next((a for a in self.spec.axes if a.name == "z"), None)
        if z is None:
            return [self.root / "grid.png"]
        return [self.root / f"grid_z{k}.png" for k in range(len(z.values))]

    def write_grids(self, records: dict[str, dict]) -> list[Path]:
        """The labelled grid pictures (only when every cell is saved); existing ones are kept."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        from .grid_image import render_grid
        axes = {a.name: a for a in self.spec.axes}
        x, y, z = axes["x"], axes.get("y"), axes.get("z")
        paths = self.grid_paths()
        for k, path in enumerate(paths):
            if path.exists():
                continue
            images, files = {}, {}
            for cell in self.spec.cells():
                if cell.at("z") != k:
                    continue
                rec = records[cell.name]
                rel = f"cells/{cell.name}/{rec['image']}"
                with Image.open(self.root / rel) as im:
                    images[(cell.at("x"), cell.at("y"))] = im.convert("RGB")
                files[cell.name] = rel
            title = "   ".join([f"x: {x.key}"] + ([f"y: {y.key}"] if y else []) +
                               ([f"z: {z.key} = {z.labels[k]}"] if z else []))
            picture = render_grid(images, x.labels, y.labels if y else [""], title)
            info = PngInfo()
            info.add_text("glass_grid", json.dumps({**self.spec.describe(), "z_index": k if z else None,
                                                    "cell_images": files}, default=repr))
            buf = _png_bytes(picture, info)
            _publish(path, buf, keep_existing=True)
        return paths


def _png_bytes(picture, info) -> bytes:
    import io
    buf = io.BytesIO()
    picture.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def _publish(path: Path, data: bytes, keep_existing: bool = False) -> None:
    """Write a whole file under its final name, never replacing one (FileExistsError unless keep_existing)."""
    fd, tmp = tempfile.mkstemp(prefix=".glass-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            outputs.link_no_replace(tmp, str(path))
        except FileExistsError:
            if not keep_existing:
                raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


_UMASK = os.umask(0)
os.umask(_UMASK)


# ----------------------------------------------------------------------------- running a grid

@dataclass
class GridProgress:
    """What ``on_cell`` receives after each saved cell."""
    done: int          # cells saved, resumed ones included
    total: int
    resumed: int       # cells found saved when this run started
    elapsed: float     # seconds of this run
    record: dict

    @property
    def seconds_left(self) -> float | None:
        ran = self.done - self.resumed
        return None if ran <= 0 else self.elapsed / ran * (self.total - self.done)

    def line(self) -> str:
        left = self.seconds_left
        eta = "" if left is None else f", about {_duration(left)} left"
        ran = self.done - self.resumed
        rate = f", {ran / max(self.elapsed, 1e-9):.2f} cells/s" if ran else ""
        return f"grid: {self.done}/{self.total} cells{rate}{eta} ({self.record['cell']})"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


@dataclass
class GridResult:
    folder: Path
    total: int
    records: dict          # cell name -> record (every saved cell)
    resumed: int           # cells that were already saved
    ran: int               # cells run this time
    duplicates: int        # results for cells already saved (a retried Ray task), dropped
    seconds: float
    grids: list = field(default_factory=list)   # grid picture paths (empty unless complete)
    run_id: str = ""       # marks the records of this run

    @property
    def complete(self) -> bool:
        return len(self.records) == self.total

    def node_runs(self) -> dict[str, int]:
        """How often each node class really ran (not served by a cache), over the cells run this time."""
        counts: dict[str, int] = {}
        for rec in self.records.values():
            if rec.get("run_id") == self.run_id:
                for ct in rec["executed"]:
                    counts[ct] = counts.get(ct, 0) + 1
        return dict(sorted(counts.items()))


def grid_folder_name(spec: GridSpec) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(spec.workflow.source).stem).strip("-") or "workflow"
    return f"grid_{stem}_{spec.fingerprint()}"


def run_grid(spec: GridSpec, output_dir=None, name: str | None = None, *, ray: str | bool | None = None,
             workers: int | None = None, threads: int | None = None, cells_per_task: int = CELLS_PER_TASK,
             on_cell: Callable[[GridProgress], None] | None = None, cancel=None) -> GridResult:
    """Run (or resume) a grid; returns when every cell is saved and the grid pictures written, or early
    (``complete`` False, no picture) when cancelled between cells; a cancel during a cell raises
    progress.Interrupted (that cell is not saved). ``cancel``: a threading.Event for the whole grid (default:
    the caller's progress.cancel_scope, such as the CLI's Ctrl-C flag, else a new one; ``on_cell`` may call
    progress.request_cancel()).

    ``ray``: None/False runs here with one Executor; True or "local" starts a local Ray cluster (or uses the
    connected one); any other string is a cluster address. ``threads``: torch CPU threads for every cell, here
    and on Ray actors (default: this process's count, so results match a plain run here: CPU float results can
    differ in the last bit between thread counts).
    """
    import torch
    threads = threads or torch.get_num_threads()
    output_dir = Path(output_dir) if output_dir is not None else runtime.get_settings().output_dir
    folder = GridFolder(Path(output_dir).resolve() / (name or grid_folder_name(spec)), spec)
    t0, run_id = time.perf_counter(), uuid.uuid4().hex
    _check_cells(spec, spec.cells())
    if cancel is None and progress.in_cancel_scope():
        cancel = progress.cancel_event()
    with contextlib.ExitStack() as stack:
        cancel = stack.enter_context(progress.cancel_scope(cancel))  # every cell's run shares this flag
        stack.callback(folder.close)
        folder.open()
        records = folder.done()
        result = GridResult(folder.root, len(spec.cells()), records, len(records), 0, 0, 0.0, run_id=run_id)
        todo = [c for c in spec.run_order() if c.name not in records]
        if todo:
            source = (_run_ray(spec, folder, todo, ray, workers, threads, cells_per_task) if ray
                      else _run_local(spec, folder, todo, threads))
            stack.callback(source.close)  # stops the Ray dataset (and a cluster started for it) at once
            for record, commit in source:
                record["run_id"] = run_id
                if not commit(record):
                    result.duplicates += 1
                    continue
                records[record["cell"]] = record
                result.ran += 1
                if on_cell is not None:
                    on_cell(GridProgress(len(records), result.total, result.resumed, time.perf_counter() - t0,
                                         record))
                if cancel.is_set():
                    break
        result.seconds = time.perf_counter() - t0
        if result.complete:
            result.grids = folder.write_grids(records)
        return result


def _check_cells(spec: GridSpec, cells: list[Cell]) -> None:
    """Validate every cell's graph before running any (a bad value fails now, not after an hour)."""
    from .executor import validate_workflow
    for cell in cells:
        errors = validate_workflow(spec.workflow, cell.overrides, spec.registry)
        if errors:
            axes = ", ".join(f"{a.key}={label(a.values[i])}" for a, i in zip(spec.axes, cell.index, strict=True))
            lines = "\n  ".join(str(e) for e in errors)
            raise GridError(f"cell {cell.name} ({axes}) is not a valid graph:\n  {lines}")


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_local(spec: GridSpec, folder: GridFolder, todo: list[Cell], threads: int) -> Iterator:
    """(record, commit) per cell, run here with one Executor (its cache spans the cells)."""
    from .executor import Executor
    executor = Executor(spec.registry)
    with _torch_threads(threads):
        for cell in todo:
            if progress.cancel_requested():
                return
            partial = folder.new_partial(cell)
            try:
                record = run_cell(executor, spec.workflow, cell, partial)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            yield record, lambda rec, p=partial: folder.commit(p, rec)


def _run_ray(spec, folder, todo, ray, workers, threads, cells_per_task) -> Iterator:
    from . import grid_ray
    address = None if ray is True or ray == "local" else ray
    groups = task_groups(spec, todo, cells_per_task)
    for record, blobs in grid_ray.run_groups(spec, groups, address, workers, threads):
        def commit(rec, blobs=blobs):
            partial = folder.new_partial(Cell(tuple(rec["index"]), rec["overrides"], tuple(rec["axes"])))
            for rel, data in zip(rec["files"], blobs, strict=True):
                target = partial / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            return folder.commit(partial, rec)

        yield record, commit


# ----------------------------------------------------------------------------- command line

def add_parser(sub) -> None:
    """The ``grid`` subcommand of nodes/cli.py."""
    g = sub.add_parser("grid", help="run a workflow over a grid of values; save every cell and a labelled grid",
                       description="Run WORKFLOW once per cell of the product of the axes; save every cell's "
                                   "images (each with its own workflow) and, when all are there, a labelled grid "
                                   "picture, under <output>/<name>/. The same command resumes an interrupted grid.")
    g.add_argument("workflow")
    for axis in AXES:
        g.add_argument(f"--{axis}", metavar="NODE.INPUT=VALUES", required=axis == "x",
                       help=f"{axis} axis: v1,v2,... | JSON list | A..B[:STEP] | @FILE (one value per line)")
    g.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE", help="override an input in every cell")
    g.add_argument("--name", help="grid folder name under the output folder (default: grid_<workflow>_<hash>; "
                                  "the same command resumes the same folder)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the cells on a Ray cluster (ADDRESS, e.g. ray://head:10001 or head:6379); "
                        "without ADDRESS a local one (needs: pip install 'glass-diffusion[ray]')")
    g.add_argument("--workers", type=int, help="Ray: actors (default: one per GPU, else one per CPU)")
    g.add_argument("--threads", type=int, help="torch CPU threads per cell (default: this machine's default)")
    g.add_argument("--models", metavar="DIR", help="models folder (default ./models); on Ray, the same path on "
                                                   "every node")
    g.add_argument("--input", metavar="DIR", help="input folder (default $GLASS_DIFFUSION_INPUT or ./input)")
    g.add_argument("--output", metavar="DIR", help="output folder (default $GLASS_DIFFUSION_OUTPUT or ./output)")
    g.add_argument("--device", choices=runtime.DEVICES, default=None)
    g.add_argument("--dtype", choices=runtime.DTYPES, default=None)


def main(args, registry) -> int:
    """``glass-diffusion grid``: exit 0 when the grid is complete, 1 failed or interrupted, 2 bad arguments."""
    import sys

    from .cli import FAILED, INVALID, OK, _guarded, _parse_sets
    try:
        axes = [parse_axis(a, getattr(args, a)) for a in AXES if getattr(args, a) is not None]
        if args.ray:
            from .grid_ray import require_ray
            require_ray(local=args.ray == "local")
        spec = GridSpec(load_workflow(args.workflow), axes, _parse_sets(args.set), registry)
    except (GridError, ValueError, OSError, ImportError) as e:  # ImportError: --ray without Ray
        print(f"error: {e}", file=sys.stderr)
        return INVALID
    results = []

    def job():
        with runtime.settings_override(models_dir=_abs(args.models), input_dir=_abs(args.input),
                                       output_dir=args.output, device=args.device, dtype=args.dtype):
            results.append(run_grid(spec, name=args.name, ray=args.ray, workers=args.workers, threads=args.threads,
                                    on_cell=lambda p: print(p.line(), file=sys.stderr, flush=True)))

    try:
        rc = _guarded(job)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return INVALID
    if rc != OK or not results or not results[0].complete:
        folder = Path(args.output or runtime.get_settings().output_dir).resolve() / (args.name or grid_folder_name(spec))
        print(f"grid not complete: run the same command again to resume ({folder})", file=sys.stderr)
        return FAILED if rc in (OK, FAILED) else rc
    result = results[0]
    runs = ", ".join(f"{k} {v}" for k, v in result.node_runs().items())
    print(f"grid: {result.total} cells ({result.resumed} already saved, {result.ran} run in {result.seconds:.1f} s)"
          + (f"; node runs: {runs}" if runs else ""), file=sys.stderr)
    for path in result.grids:
        print(path)
    return OK


def _abs(path):
    return None if path is None else Path(path).expanduser().resolve()

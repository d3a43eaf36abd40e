"""The cells of a grid on a Ray cluster: a Ray Data dataset of tasks, mapped by a pool of actors.

Ray is an optional extra (``pip install 'glass-diffusion[ray]'``); nothing else in the pack imports it.
Each dataset row is one task (a few cells, see grid.task_groups). ``CellWorker`` actors, one per GPU where the
cluster has GPUs (else one per CPU), each keep one Executor, so a model is loaded once per actor and shared
nodes (a text encoding) are reused across the cells of a task and across tasks. An actor runs a cell into a
temporary folder on its own node and returns the files' bytes; the driver (nodes/grid.py) writes them into
the grid folder, so outputs land on the driver's disk only. An actor that dies is restarted by Ray and its
task retried; the driver keeps the first result of every cell (a cell is saved exactly once).
Every worker uses the driver's noise (the workflow's seeds; the samplers' CPU noise source by default) and
the same number of torch threads, so a cell's image equals the local run's on the same kind of device.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

RAY_HINT = ("--ray needs Ray, an optional extra: pip install 'glass-diffusion[ray]' "
            "(or pip install 'ray[data]' into the same environment)")


class RayMissing(ImportError):
    pass


def require_ray(local: bool = False):
    """The ray module, or RayMissing with the install hint. ``local``: a cluster this process will start, so
    (when Ray is not imported yet) every Ray listener binds to 127.0.0.1 and no usage report is sent."""
    if local and "ray" not in sys.modules:  # (Ray reads these when it is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] part: pyarrow)
    except ImportError as e:
        raise RayMissing(f"{RAY_HINT} ({e})") from None
    return ray


class CellWorker:
    """A Ray Data actor: ``__init__`` sets up once per actor, ``__call__`` runs a batch of tasks."""

    def __init__(self, workflow: dict, settings: dict, threads: int):
        import torch

        from . import runtime
        from .executor import Executor
        from .workflow import Workflow, default_registry
        torch.set_num_threads(threads)
        runtime.configure(**settings)
        self.workflow = Workflow(**workflow)
        self.executor = Executor(default_registry())  # its cache keeps the models between cells

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .grid import Cell, run_cell
        cells, records, blobs = [], [], []
        for task in batch["task"]:
            for c in json.loads(task):
                cell = Cell(tuple(c["index"]), c["overrides"], tuple(c["axes"]))
                out = Path(tempfile.mkdtemp(prefix="glass-grid-cell-"))
                try:
                    record = run_cell(self.executor, self.workflow, cell, out)
                    data = [(out / rel).read_bytes() for rel in record["files"]]
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                record["sizes"] = [len(d) for d in data]
                cells.append(cell.name)
                records.append(json.dumps(record))
                blobs.append(b"".join(data))
        return {"cell": np.array(cells, dtype=object), "record": np.array(records, dtype=object),
                "data": np.array(blobs, dtype=object)}


def _connect(address: str | None) -> bool:
    """Start or join a cluster unless one is connected; True when this call did (shut it down after)."""
    ray = require_ray(local=address is None)
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False} if address is None else {"address": address}
    ray.init(logging_level=logging.WARNING, **kwargs)
    return True


def run_groups(spec, groups: list, address: str | None, workers: int | None, threads: int) -> Iterator:
    """(record, [file bytes]) for every cell of ``groups`` as the actors finish them (any order)."""
    from . import runtime
    started = _connect(address)
    ray = require_ray()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the grid prints its own progress
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        size = max(1, min(workers or gpus or int(resources.get("CPU", 1)), len(groups)))
        s = runtime.get_settings()
        settings = {"models_dir": str(Path(s.models_dir).resolve()), "input_dir": str(Path(s.input_dir).resolve()),
                    "device": s.device, "dtype": s.dtype}
        workflow = {"api": spec.workflow.api, "ui": spec.workflow.ui, "source": spec.workflow.source}
        rows = [{"task": json.dumps([{"index": list(c.index), "overrides": c.overrides, "axes": list(c.axes)}
                                     for c in g])}
                for g in groups]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one task per block: spread over actors
        # one task in flight per actor: tasks go to whichever actor is free (actors start at different times);
        # Ray Data restarts a dead actor and retries its task (its default max_restarts / max_task_retries: -1)
        pool = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)
        ds = ds.map_batches(CellWorker, batch_size=1, compute=pool, **per_actor,
                            fn_constructor_kwargs={"workflow": workflow, "settings": settings, "threads": threads})
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            data, blobs, at = row["data"], [], 0
            for n in record.pop("sizes"):
                blobs.append(bytes(data[at:at + n]))
                at += n
            yield record, blobs
    finally:
        if started:
            ray.shutdown()

"""Grid throughput: a seeds x prompts glass-tiny grid here (one Executor) and through a local Ray cluster (one
actor per CPU), in one run, on the same cells; prints cells per second, the ratio, and how often the text
encoder ran. Measured, never asserted.

    python tests/benchmark_grid.py [--seeds 8] [--prompts 8] [--steps 20] [--threads N] [--no-ray]

The Ray figure includes starting the cluster and the actors (each imports torch and loads the model once);
the cells/s line after "first cell" leaves that start-up out.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from glass_diffusion.nodes.example_workflows import WORKFLOWS_DIR  # noqa: E402
from glass_diffusion.nodes.grid import Axis, GridSpec, run_grid  # noqa: E402
from glass_diffusion.nodes.workflow import load_workflow  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle")


def prompts(n: int) -> list[str]:
    combos = [(c, s) for s in SHAPES for c in COLOURS]
    return [f"a {c} {s} in the center on a grey background" for c, s in combos[:n]]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: torch's)")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per CPU)")
    p.add_argument("--no-ray", action="store_true")
    a = p.parse_args()
    threads = a.threads or torch.get_num_threads()
    spec = GridSpec(load_workflow(WORKFLOWS_DIR / "api" / "text_to_image.json"),
                    [Axis("x", "Sampler.seed", tuple(range(1, a.seeds + 1))),
                     Axis("y", "Positive.text", tuple(prompts(a.prompts)))], {"Sampler.steps": a.steps})
    n = a.seeds * a.prompts
    print(f"{n} cells ({a.seeds} seeds x {a.prompts} prompts), {a.steps} steps, glass-tiny, {os.cpu_count()} CPUs, "
          f"torch threads per cell {threads}")
    with tempfile.TemporaryDirectory(prefix="glass-grid-bench-") as tmp:
        first = {}

        def note(p):
            first.setdefault("t", time.perf_counter())

        t0 = time.perf_counter()
        local = run_grid(spec, Path(tmp), name="local", threads=threads, on_cell=note)
        t_local = time.perf_counter() - t0
        runs = local.node_runs()
        print(f"local: {n / t_local:.2f} cells/s ({t_local:.1f} s); text encoder ran {runs.get('GlassTextEncode')} "
              f"times for {n} cells (without reuse: {2 * n}); checkpoint loaded {runs.get('GlassCheckpointLoader')}x")
        if a.no_ray:
            return
        import ray
        first.clear()
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=200 * 1024**2,
                 logging_level="WARNING", log_to_driver=False)
        t_init = time.perf_counter() - t0
        try:
            remote = run_grid(spec, Path(tmp), name="ray", ray=True, threads=threads, workers=a.workers, on_cell=note)
        finally:
            ray.shutdown()
        t_ray = time.perf_counter() - t0
        same = all((Path(tmp) / "local" / "cells" / c / r["image"]).read_bytes() ==
                   (Path(tmp) / "ray" / "cells" / c / remote.records[c]["image"]).read_bytes() for c, r in
                   local.records.items())
        after_first = (n - 1) / max(1e-9, time.perf_counter() - first["t"]) if "t" in first else float("nan")
        runs = remote.node_runs()
        print(f"ray:   {n / t_ray:.2f} cells/s ({t_ray:.1f} s, of which cluster start {t_init:.1f} s); "
              f"{after_first:.2f} cells/s after the first cell; text encoder ran {runs.get('GlassTextEncode')} times, "
              f"checkpoint loaded {runs.get('GlassCheckpointLoader')}x over the actors")
        print(f"ray / local: {t_local / t_ray:.2f}x throughput; every cell's PNG identical: {same}")


if __name__ == "__main__":
    main()

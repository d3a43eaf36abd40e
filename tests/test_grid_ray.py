"""`glass-diffusion grid --ray` on a local Ray cluster that this module starts (2 CPUs, loopback only, no
dashboard, no usage report): the 2 x 4 grid equals the local one and single runs bit for bit; an actor killed
mid-grid changes nothing; a Ray grid interrupted and resumed here gives the same grid. Skipped without Ray."""
import os
import signal
import time

import pytest
import torch

# before Ray is imported: every Ray listener on 127.0.0.1 only, and no usage statistics
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import _grid_util as gu  # noqa: E402
from glass_diffusion.nodes import progress  # noqa: E402
from glass_diffusion.nodes.grid import run_grid  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors use the driver's count too
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already connected in this process")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, logging_level="WARNING",
             log_to_driver=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The same grid run here, and the single-run reference."""
    root = tmp_path_factory.mktemp("local")
    result = run_grid(gu.spec(), root, name="g")
    assert result.complete
    return {"folder": result.folder, "grid": result.grids[0].read_bytes(), "cells": gu.cell_images(result.folder),
            "reference": gu.reference(root / "ref")}


def test_ray_grid_is_bitwise_the_local_grid(cluster, local, tmp_path):
    result = run_grid(gu.spec(), tmp_path, name="g", ray=True)
    assert result.complete and result.ran == 8 and result.duplicates == 0
    cells = gu.cell_images(result.folder)
    assert cells == local["cells"] == {k: [v] for k, v in local["reference"].items()}
    assert result.grids[0].read_bytes() == local["grid"]
    workers = {r["worker"] for r in result.records.values()}
    assert all(w.rsplit(":", 1)[1] != str(os.getpid()) for w in workers)  # made by the actors, not here
    # each actor loaded the model once and reused the text encodings of its cells
    runs = result.node_runs()
    assert runs["GlassCheckpointLoader"] <= 2 and runs["GlassKSampler"] == 8 and runs["GlassTextEncode"] <= 4


def test_killed_actor_mid_grid_changes_nothing(cluster, local, tmp_path):
    killed = []

    def kill_first_worker(p):
        if not killed:  # its next tasks are queued or running: they must be retried elsewhere
            pid = int(p.record["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = run_grid(gu.spec(), tmp_path, name="g", ray=True, cells_per_task=1, on_cell=kill_first_worker)
    assert killed and result.complete
    time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # the actor process is really gone
    assert sorted(result.records) == sorted(local["cells"])  # every cell exactly once
    assert gu.cell_images(result.folder) == local["cells"] and result.grids[0].read_bytes() == local["grid"]
    after = [r["worker"] for r in result.records.values()][1:]
    assert any(int(w.rsplit(":", 1)[1]) != killed[0] for w in after)


def test_ray_grid_interrupted_then_resumed_here(cluster, local, tmp_path):
    def stop_after_two(p):
        if p.done == 2:
            progress.request_cancel()

    first = run_grid(gu.spec(), tmp_path, name="g", ray=True, cells_per_task=1, on_cell=stop_after_two)
    progress.clear_cancel()
    assert not first.complete and first.grids == [] and not (tmp_path / "g" / "grid.png").exists()
    assert len(list((tmp_path / "g" / "cells").iterdir())) == 2
    second = run_grid(gu.spec(), tmp_path, name="g")  # resumed without Ray
    assert second.complete and second.resumed == 2 and second.ran == 6
    assert gu.cell_images(second.folder) == local["cells"] and second.grids[0].read_bytes() == local["grid"]

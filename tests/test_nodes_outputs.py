"""Output transactions (nodes/outputs.py): staged files appear only on commit, under names that were free,
never replacing a file; rollback leaves nothing; the executor commits a run only when it fully succeeds,
and runs output nodes after everything else they need."""
import pytest
import torch

import _graph_util as g
from glass_diffusion.nodes import image as image_nodes
from glass_diffusion.nodes import outputs, progress, runtime
from glass_diffusion.nodes.executor import Executor, NodeExecutionError


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def _write(data: bytes):
    return lambda f: f.write(data)


def test_staged_files_appear_only_on_commit_with_the_reserved_names(tmp_path):
    (tmp_path / "a_00002_.png").write_bytes(b"theirs")
    txn = outputs.OutputTransaction()
    r1, r2, r3 = {}, {}, {}
    assert txn.stage(tmp_path, "a", 1, _write(b"one"), r1) == 1
    assert txn.stage(tmp_path, "a", 1, _write(b"two"), r2) == 3  # 1 reserved by us, 2 taken on disk
    assert txn.stage(tmp_path, "b", 7, _write(b"three"), r3) == 7
    assert (r1["filename"], r2["filename"], r3["filename"]) == ("a_00001_.png", "a_00003_.png", "b_00007_.png")
    assert [n for n in _files(tmp_path) if not n.endswith(".tmp")] == ["a_00002_.png"]  # nothing named yet
    assert len(txn) == 3 and len([n for n in _files(tmp_path) if n.endswith(".png.tmp")]) == 3
    txn.commit()
    assert _files(tmp_path) == ["a_00001_.png", "a_00002_.png", "a_00003_.png", "b_00007_.png"]
    assert (tmp_path / "a_00001_.png").read_bytes() == b"one" and (tmp_path / "a_00002_.png").read_bytes() == b"theirs"
    with pytest.raises(RuntimeError, match="committed"):
        txn.stage(tmp_path, "a", 1, _write(b""), {})


def test_a_name_taken_between_stage_and_commit_is_never_overwritten(tmp_path):
    txn = outputs.OutputTransaction()
    r1, r2 = {}, {}
    txn.stage(tmp_path, "x", 1, _write(b"ours 1"), r1)
    txn.stage(tmp_path, "x", 1, _write(b"ours 2"), r2)
    (tmp_path / "x_00001_.png").write_bytes(b"theirs")  # another process, after our staging
    txn.commit()
    assert (tmp_path / "x_00001_.png").read_bytes() == b"theirs"
    assert (r1["filename"], r2["filename"]) == ("x_00003_.png", "x_00002_.png")  # ui entries follow, in place
    assert (tmp_path / r1["filename"]).read_bytes() == b"ours 1"
    assert (tmp_path / r2["filename"]).read_bytes() == b"ours 2"
    assert _files(tmp_path) == ["x_00001_.png", "x_00002_.png", "x_00003_.png"]


def test_rollback_and_a_failing_commit_leave_nothing(tmp_path, monkeypatch):
    txn = outputs.OutputTransaction()
    txn.stage(tmp_path, "r", 1, _write(b"1"), {})
    with pytest.raises(ValueError):
        txn.stage(tmp_path, "r", 1, lambda f: (_ for _ in ()).throw(ValueError("encoder broke")), {})
    txn.rollback()
    assert _files(tmp_path) == []

    txn = outputs.OutputTransaction()
    for i in range(3):
        txn.stage(tmp_path, "k", 1, _write(b"%d" % i), {})
    real, calls = outputs.link_no_replace, []

    def interrupted_on_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a second Ctrl-C in the middle of the commit
        real(src, dst)

    monkeypatch.setattr(outputs, "link_no_replace", interrupted_on_third)
    with pytest.raises(KeyboardInterrupt):
        txn.commit()
    assert len(calls) == 3 and _files(tmp_path) == [] and txn.state == "rolled back"


def test_transaction_context_commits_or_rolls_back(tmp_path):
    assert outputs.current() is None
    with outputs.transaction() as txn:
        assert outputs.current() is txn and not len(txn) and txn  # an empty transaction is still truthy
        txn.stage(tmp_path, "ok", 1, _write(b"1"), {})
    assert outputs.current() is None and _files(tmp_path) == ["ok_00001_.png"]
    with pytest.raises(RuntimeError, match="later"):
        with outputs.transaction() as txn:
            txn.stage(tmp_path, "no", 1, _write(b"1"), {})
            raise RuntimeError("later failure")
    assert outputs.current() is None and _files(tmp_path) == ["ok_00001_.png"]


def test_save_node_stages_into_the_current_transaction(tmp_path):
    save = image_nodes.GlassSaveImage()
    with runtime.settings_override(output_dir=tmp_path), outputs.transaction() as txn:
        first = save.save(torch.rand(2, 8, 8, 3), "t")["ui"]["images"]
        second = save.save(torch.rand(1, 8, 8, 3), "t")["ui"]["images"]
        assert [i["filename"] for i in first + second] == ["t_00001_.png", "t_00002_.png", "t_00003_.png"]
        assert len(txn) == 3 and not list(tmp_path.glob("*.png"))
    assert _files(tmp_path) == ["t_00001_.png", "t_00002_.png", "t_00003_.png"]
    # no current transaction (as inside ComfyUI): the files are there when the call returns
    with runtime.settings_override(output_dir=tmp_path):
        r = save.save(torch.rand(1, 8, 8, 3), "t")["ui"]["images"]
    assert r[0]["filename"] == "t_00004_.png" and (tmp_path / "t_00004_.png").is_file()


# ----------------------------------------------------------------------------- through the executor

class StageSink(g.Sink):
    """An output node that saves '<value>' as a staged file in ``folder``."""
    folder = None

    def save(self, value, path="", prompt=None, extra_pnginfo=None, unique_id=None):
        g.CALLS["StageSink"] += 1
        entry = {"subfolder": "", "type": "output"}
        outputs.current().stage(StageSink.folder, f"v{value}", 1, _write(str(value).encode()), entry)
        return {"ui": {"files": [entry]}}


class FailSink(g.Sink):
    def save(self, value, **kwargs):
        raise OSError("disk full")


class CancelSink(g.Sink):
    def save(self, value, **kwargs):
        progress.request_cancel()
        return {"ui": {"values": [value]}}


REG = {**g.REGISTRY, "StageSink": StageSink, "FailSink": FailSink, "CancelSink": CancelSink}


@pytest.fixture(autouse=True)
def _reset(tmp_path):
    g.reset()
    StageSink.folder = tmp_path
    yield
    progress.clear_cancel()


def test_output_nodes_run_after_everything_they_need():
    graph = g.api(n1=("Const", {"value": 1}), n2=("Sink", {"value": ["1", 0]}),
                  n3=("Add", {"a": ["1", 0], "b": 1}), n4=("Sink", {"value": ["3", 0]}))
    assert Executor(REG).run(graph).executed == ["1", "3", "2", "4"]


@pytest.mark.parametrize("last", ["FailSink", "CancelSink", "Fails"])
def test_a_failing_or_cancelled_run_writes_no_file(tmp_path, last):
    graph = g.api(n1=("Const", {"value": 5}), n2=("StageSink", {"value": ["1", 0]}),
                  n3=("StageSink", {"value": 6}))
    if last == "Fails":  # a failing non-output node that an output node needs runs before every output node
        graph.update(g.api(n4=("Fails", {"x": ["1", 0]}), n5=("Sink", {"value": ["4", 0]})))
    else:
        graph.update(g.api(n5=(last, {"value": ["1", 0]})))
    ex = Executor(REG)
    with pytest.raises(progress.Interrupted if last == "CancelSink" else NodeExecutionError) as info:
        ex.run(graph)
    assert _files(tmp_path) == []
    if last == "FailSink":
        assert info.value.node_id == "5" and info.value.partial.executed == ["1", "2", "3"] and info.value.partial.ui == {}
    if last == "Fails":
        assert g.CALLS["StageSink"] == 0  # the failure came first: nothing was even staged
    # the staged nodes were not cached: a good run with the same executor saves them
    progress.clear_cancel()
    del graph["5"]
    graph.pop("4", None)
    result = ex.run(graph)
    assert _files(tmp_path) == ["v5_00001_.png", "v6_00001_.png"]
    assert result.ui["2"] == {"files": [{"filename": "v5_00001_.png", "subfolder": "", "type": "output"}]}
    # an identical rerun comes from the cache and writes nothing new (as ComfyUI)
    assert ex.run(graph).executed == [] and len(_files(tmp_path)) == 2


def test_committed_files_get_the_usual_mode_not_the_temp_files_0600(tmp_path):
    import os
    umask = os.umask(0o022)  # the process umask (read once at import by the module; unchanged since)
    os.umask(umask)
    txn = outputs.OutputTransaction()
    txn.stage(tmp_path, "a", 1, _write(b"one"), {})
    (placed,) = txn.commit()
    assert (placed.stat().st_mode & 0o777) == 0o666 & ~umask

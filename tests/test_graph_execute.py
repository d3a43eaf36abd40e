"""Execution: only what outputs need, caching between runs, IS_CHANGED, NOT_IDEMPOTENT, errors,
cancellation between nodes and steps, list semantics."""
import sys
import types

import pytest

import _graph_util as g
from glass_diffusion.nodes import progress
from glass_diffusion.nodes.executor import Executor, NodeExecutionError, run_workflow

REG = g.REGISTRY


@pytest.fixture(autouse=True)
def _reset():
    g.reset()
    yield
    progress.clear_cancel()


def chain(b=5):
    return g.api(n1=("Const", {"value": 2}), n2=("Add", {"a": ["1", 0], "b": b}), n3=("Sink", {"value": ["2", 0]}))


def test_runs_in_dependency_order_and_only_what_outputs_need():
    graph = chain()
    graph["9"] = {"class_type": "Text", "inputs": {"text": "unused"}}
    graph["0"] = {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}}  # not feeding a sink
    result = Executor(REG).run(graph)
    assert result.executed == ["1", "2", "3"]
    assert result.ui == {"3": {"values": [7]}} and result.output("2") == 7
    assert g.CALLS == {"Const": 1, "Add": 1, "Sink": 1}


def test_identical_rerun_is_cached():
    ex = Executor(REG)
    ex.run(chain())
    second = ex.run(chain())
    assert g.CALLS == {"Const": 1, "Add": 1, "Sink": 1}
    assert second.executed == [] and second.ui == {"3": {"values": [7]}}  # ui replayed from the cache


def test_changed_widget_reruns_it_and_downstream_only():
    ex = Executor(REG)
    ex.run(chain(5))
    result = ex.run(chain(6))
    assert result.executed == ["2", "3"] and result.ui["3"] == {"values": [8]}
    assert g.CALLS == {"Const": 1, "Add": 2, "Sink": 2}


def test_is_changed_triggers_a_rerun():
    graph = g.api(n1=("Changing", {"x": 1}), n2=("Sink", {"value": ["1", 0]}))
    ex = Executor(REG)
    ex.run(graph)
    ex.run(graph)
    assert g.CALLS["Changing"] == 1
    g.Changing.token = "file changed"
    assert ex.run(graph).executed == ["1", "2"]
    assert g.CALLS["Changing"] == 2


def test_is_changed_nan_always_reruns():
    class Always(g.Changing):
        @classmethod
        def IS_CHANGED(cls, x):
            return float("nan")
    graph = g.api(n1=("Always", {"x": 1}), n2=("Sink", {"value": ["1", 0]}))
    ex = Executor({**REG, "Always": Always})
    ex.run(graph)
    assert ex.run(graph).executed == ["1", "2"]


def test_identical_nodes_share_a_result_unless_not_idempotent():
    def graph(kind):
        return g.api(n1=(kind, {"value": 3}), n2=(kind, {"value": 3}),
                     n3=("Add", {"a": ["1", 0], "b": 0, "c": ["2", 0]}), n4=("Sink", {"value": ["3", 0]}))
    assert Executor(REG).run(graph("Const")).output("3") == 6
    assert g.CALLS["Const"] == 1
    Executor(REG).run(graph("Impure"))
    assert g.CALLS["Impure"] == 2


def test_node_error_names_node_and_keeps_original():
    graph = g.api(n1=("Const", {"value": 1}), n2=("Fails", {"x": ["1", 0]}), n3=("Sink", {"value": ["2", 0]}))
    ex = Executor(REG)
    with pytest.raises(NodeExecutionError) as info:
        ex.run(graph)
    err = info.value
    assert (err.node_id, err.class_type) == ("2", "Fails")
    assert "node 2 (Fails)" in str(err) and "ValueError: boom 1" in str(err)
    assert isinstance(err.__cause__, ValueError)
    assert err.partial.outputs["1"] == ([1],) and g.CALLS["Sink"] == 0
    # finished work stays cached: fixing the graph reruns only what changed
    graph["2"] = {"class_type": "Negate", "inputs": {"x": ["1", 0]}}
    assert ex.run(graph).executed == ["2", "3"]


def test_bad_return_value_is_a_node_error():
    class Bad(g.Const):
        def run(self, value):
            return value  # not a tuple
    graph = g.api(n1=("Bad", {"value": 1}), n2=("Sink", {"value": ["1", 0]}))
    with pytest.raises(NodeExecutionError, match=r"node 1 \(Bad\).*expected a tuple of 1 output"):
        Executor({**REG, "Bad": Bad}).run(graph)


def test_cancel_stops_between_nodes():
    graph = g.api(n1=("Const", {"value": 1}), n2=("Cancel", {"x": ["1", 0]}), n3=("Add", {"a": ["2", 0], "b": 1}),
                  n4=("Sink", {"value": ["3", 0]}))
    ex = Executor(REG)
    with pytest.raises(progress.Interrupted):
        ex.run(graph)
    assert g.CALLS == {"Const": 1, "Cancel": 1}
    result = ex.run(graph)  # a new run clears the flag and reuses the finished nodes
    assert result.executed == ["3", "4"] and result.ui["4"] == {"values": [2]}


def test_progress_bar_raises_when_cancelled():
    bar = progress.ProgressBar(3)
    bar.update(1)
    seen = []
    progress.set_preview_hook(lambda image, value, total: seen.append((image, value, total)))
    try:
        bar.update_absolute(2, 3, preview="img")
        progress.request_cancel()
        with pytest.raises(progress.Interrupted):
            bar.update(1)
    finally:
        progress.set_preview_hook(None)
    assert seen == [("img", 2, 3)] and bar.current == 2


def test_output_and_input_lists():
    graph = g.api(n1=("Const", {"value": 0}), n2=("Repeat", {"x": ["1", 0], "n": 3}),
                  n3=("Add", {"a": ["2", 0], "b": 10}), n4=("Total", {"xs": ["3", 0]}),
                  n5=("Sink", {"value": ["4", 0]}), n6=("Sink", {"value": ["3", 0]}))
    result = run_workflow(graph, registry=REG)
    assert result.outputs["3"] == ([10, 11, 12],) and g.CALLS["Add"] == 3
    assert result.output("4") == 33
    assert result.ui == {"5": {"values": [33]}, "6": {"values": [10, 11, 12]}}


def test_progress_inside_comfyui_uses_its_bar_and_interrupt(monkeypatch):
    calls = []

    class FakeBar:
        def __init__(self, total):
            calls.append(("bar", total))

        def update_absolute(self, value, total, preview):
            calls.append(("update", value, total, preview))

    class Stop(Exception):
        pass

    def throw():
        if calls and calls[-1] == "cancel":
            raise Stop
    comfy = types.ModuleType("comfy")
    mm = types.SimpleNamespace(throw_exception_if_processing_interrupted=throw)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=FakeBar))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    comfy.utils, comfy.model_management = sys.modules["comfy.utils"], mm
    assert progress.in_comfyui() and progress.previews_enabled()
    bar = progress.ProgressBar(4)
    bar.update_absolute(1, 4, preview="img")
    bar.update(2)
    assert calls == [("bar", 4), ("update", 1, 4, ("JPEG", "img", 512)), ("update", 3, 4, None)]
    calls.append("cancel")  # ComfyUI's Cancel button
    with pytest.raises(Stop):
        bar.update(1)


def test_hooks_declared_without_classmethod():
    class Plain(g.Const):
        seen = []

        def IS_CHANGED(self, value):  # noqa: N802 (ComfyUI's names)
            Plain.seen.append(value)
            return value

        def VALIDATE_INPUTS(self, value):  # noqa: N802
            return value != 13 or "13 is unlucky"
    reg = {**REG, "Plain": Plain}
    graph = g.api(n1=("Plain", {"value": 3}), n2=("Sink", {"value": ["1", 0]}))
    ex = Executor(reg)
    ex.run(graph)
    assert ex.run(graph).executed == [] and Plain.seen == [3, 3]
    graph["1"]["inputs"]["value"] = 13
    assert [e.message for e in ex.validate(graph)] == ["custom validation failed: 13 is unlucky"]


class _Model:
    """A stand-in for a loaded model: a weakref tells whether anything still holds it."""


class _LoadModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "m"})}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"

    def run(self, name):
        return (_Model(),)


class _UseModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    seen: list = []

    def run(self, model):
        import weakref
        _UseModel.seen.append(weakref.ref(model))
        return (1,)


class _Later:
    """Runs after the model's only user; records whether the model was still alive then."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"forceInput": True})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    alive: list = []

    def run(self, x):
        import gc
        gc.collect()
        _Later.alive.append(all(r() is not None for r in _UseModel.seen))
        return (x,)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_false_releases_a_model_after_its_last_use(keep):
    reg = {**REG, "LoadModel": _LoadModel, "UseModel": _UseModel, "Later": _Later}
    _UseModel.seen.clear()
    _Later.alive.clear()
    graph = g.api(n1=("LoadModel", {"name": "m"}), n2=("UseModel", {"model": ["1", 0]}),
                  n3=("Later", {"x": ["2", 0]}), n4=("Sink", {"value": ["3", 0]}))
    ex = Executor(reg, keep=keep)
    result = ex.run(graph)
    assert _Later.alive == [keep]  # released before the later node ran, or kept for the next run
    assert ("1" in result.outputs) is keep and "4" in result.outputs and g.SUNK[-1][0] == 1
    ex.run(graph)
    assert len(_UseModel.seen) == (1 if keep else 2)  # kept: the second run came from the cache

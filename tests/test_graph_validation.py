"""Validation: one test per error kind; each message names the node id, its type and the input."""
import pytest

import _graph_util as g
from glass_diffusion.nodes.executor import (GraphValidationError, run_workflow, validate_workflow)


class ComboSource:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}
    RETURN_TYPES = (["add", "mul"],)
    FUNCTION = "run"

    def run(self):
        return ("mul",)


REG = {**g.REGISTRY, "ComboSource": ComboSource}


@pytest.fixture(autouse=True)
def _reset():
    g.reset()


def errors_of(graph):
    return validate_workflow(graph, registry=REG)


def only_error(graph, kind, node_id, class_type, input_name):
    errs = errors_of(graph)
    assert [e.kind for e in errs] == [kind], [str(e) for e in errs]
    e = errs[0]
    assert (e.node_id, e.class_type, e.input_name) == (node_id, class_type, input_name)
    text = str(e)
    assert f"node {node_id}" in text and class_type in text
    if input_name:
        assert input_name in text
    return e


def sink(src="1", slot=0):
    return ("Sink", {"value": [src, slot]})


def test_valid_graph_has_no_errors():
    assert errors_of(g.api(n1=("Const", {"value": 3}), n2=("Add", {"a": ["1", 0], "b": 1}), n3=sink("2"))) == []


def test_unknown_node_type():
    only_error(g.api(n1=("Const", {"value": 3}), n2=("NoSuchNode", {}), n3=sink()),
               "unknown_node_type", "2", "NoSuchNode", None)


def test_required_input_missing():
    only_error(g.api(n1=("Add", {"a": 1}), n2=sink()), "required_input_missing", "1", "Add", "b")


def test_link_type_mismatch():
    e = only_error(g.api(n1=("MakeImage", {}), n2=("Add", {"a": ["1", 0], "b": 1}), n3=sink("2")),
                   "return_type_mismatch", "2", "Add", "a")
    assert "IMAGE" in e.message and "INT" in e.message


def test_any_type_and_combo_links_match():
    graph = g.api(n1=("MakeImage", {}), n2=sink("1"), n3=("ComboSource", {}),
                  n4=("Seeded", {"seed": 1, "mode": ["3", 0], "scale": 1.0, "note": ""}), n5=sink("4"))
    assert errors_of(graph) == []


def test_combo_output_into_int_input_is_a_mismatch():
    only_error(g.api(n1=("ComboSource", {}), n2=("Add", {"a": ["1", 0], "b": 1}), n3=sink("2")),
               "return_type_mismatch", "2", "Add", "a")


def test_value_below_min_and_above_max():
    only_error(g.api(n1=("Const", {"value": -101}), n2=sink()), "value_smaller_than_min", "1", "Const", "value")
    e = only_error(g.api(n1=("Const", {"value": 101}), n2=sink()), "value_bigger_than_max", "1", "Const", "value")
    assert "101" in e.message and "100" in e.message


def test_value_not_in_combo():
    e = only_error(g.api(n1=("Seeded", {"seed": 1, "mode": "pow", "scale": 1.0, "note": ""}), n2=sink()),
                   "value_not_in_list", "1", "Seeded", "mode")
    assert "'pow'" in e.message


def test_wrong_value_type():
    only_error(g.api(n1=("Const", {"value": "seven"}), n2=sink()), "invalid_input_type", "1", "Const", "value")
    only_error(g.api(n1=("Const", {"value": 2.5}), n2=sink()), "invalid_input_type", "1", "Const", "value")
    only_error(g.api(n1=("Seeded", {"seed": 1, "mode": "add", "scale": {"x": 1}, "note": ""}), n2=sink()),
               "invalid_input_type", "1", "Seeded", "scale")
    e = only_error(g.api(n1=("Negate", {"x": 5}), n2=sink()), "invalid_input_type", "1", "Negate", "x")
    assert "needs a link" in e.message


def test_values_are_converted_to_their_widget_type():
    graph = g.api(n1=("Seeded", {"seed": 4.0, "mode": "add", "scale": 2, "note": 12}), n2=sink())
    result = run_workflow(graph, registry=REG)
    assert result.prompt["1"]["inputs"] == {"seed": 4, "mode": "add", "scale": 2.0, "note": "12"}
    assert isinstance(result.prompt["1"]["inputs"]["scale"], float)


def test_cycle():
    errs = errors_of(g.api(n1=("Add", {"a": ["2", 0], "b": 1}), n2=("Add", {"a": ["1", 0], "b": 1}), n3=sink("2")))
    assert sorted((e.kind, e.node_id, e.class_type, e.input_name) for e in errs) == [
        ("dependency_cycle", "1", "Add", "a"), ("dependency_cycle", "2", "Add", "a")]
    assert "cycle" in str(errs[0]) and "node 1 (Add) input 'a'" in str(errs[0])


def test_self_loop_is_a_cycle():
    only_error(g.api(n1=("Add", {"a": ["1", 0], "b": 1}), n2=sink()), "dependency_cycle", "1", "Add", "a")


def test_link_to_missing_node():
    e = only_error(g.api(n1=("Add", {"a": ["9", 0], "b": 1}), n2=sink()), "link_to_missing_node", "1", "Add", "a")
    assert "9" in e.message


def test_link_to_missing_output_slot():
    e = only_error(g.api(n1=("Const", {"value": 1}), n2=sink("1", 2)), "bad_output_slot", "2", "Sink", "value")
    assert "output 2 of node 1 (Const)" in e.message


def test_malformed_link():
    only_error(g.api(n1=("Const", {"value": 1}), n2=("Sink", {"value": ["1"]})), "bad_linked_input", "2", "Sink", "value")


def test_validate_inputs_is_honoured():
    e = only_error(g.api(n1=("Even", {"x": 3}), n2=sink()), "custom_validation_failed", "1", "Even", "x")
    assert "x must be even, got 3" in e.message
    # VALIDATE_INPUTS takes x, so x's own min/max check is left to it (as ComfyUI does)
    assert errors_of(g.api(n1=("Even", {"x": 12}), n2=sink())) == []


def test_no_output_node():
    errs = errors_of(g.api(n1=("Const", {"value": 1})))
    assert [e.kind for e in errs] == ["prompt_no_outputs"]


def test_every_problem_is_reported_and_nothing_runs():
    graph = g.api(n1=("Const", {"value": 1000}), n2=("Add", {"a": ["1", 0]}), n3=("Seeded", {"seed": -1}),
                  n4=("Sink", {"value": ["2", 0]}), n5=("Sink", {"value": ["3", 0]}), n6=("Nope", {}))
    with pytest.raises(GraphValidationError) as info:
        run_workflow(graph, registry=REG)
    found = {(e.node_id, e.input_name, e.kind) for e in info.value.errors}
    assert found == {("1", "value", "value_bigger_than_max"), ("2", "b", "required_input_missing"),
                     ("3", "seed", "value_smaller_than_min"), ("3", "mode", "required_input_missing"),
                     ("3", "scale", "required_input_missing"), ("3", "note", "required_input_missing"),
                     ("6", None, "unknown_node_type")}
    assert "node 2 (Add) input 'b'" in str(info.value)
    assert not g.CALLS


def test_nodes_no_output_needs_are_not_validated():
    # as in ComfyUI: a dangling node outside every output's inputs is neither run nor checked
    assert errors_of(g.api(n1=("Const", {"value": 1}), n2=sink(), n3=("Add", {}))) == []


def test_any_type_input_takes_a_literal():
    assert run_workflow(g.api(n1=("Sink", {"value": {"any": "thing"}})), registry=REG).ui == {
        "1": {"values": [{"any": "thing"}]}}


def test_subgraph_node_gets_a_hint():
    e = only_error(g.api(n1=("Const", {"value": 1}), n2=sink(), n3=("0a1b2c3d-0000-4000-8000-00000000abcd", {})),
                   "unknown_node_type", "3", "0a1b2c3d-0000-4000-8000-00000000abcd", None)
    assert "subgraph" in e.message

"""UI -> API conversion: both link schemas, control_after_generate, bypass, mute, Reroute, PrimitiveNode."""
import pytest

import _graph_util as g
from glass_diffusion.nodes.executor import GraphValidationError, run_workflow, validate_workflow
from glass_diffusion.nodes.workflow import apply_overrides, convert_ui_to_api, widget_slots

REG = g.REGISTRY


@pytest.fixture(autouse=True)
def _reset():
    g.reset()


def seeded_to_sink(schema, widgets=(5, "randomize", "mul", 2.0, "hi")):
    b = g.UIBuilder()
    b.node(3, "Seeded", widgets, outputs=[("INT", "INT")])
    b.node(7, "Sink", [""], inputs=[("value", "*")])
    b.link(3, 0, 7, 0)
    return b.build(schema)


@pytest.mark.parametrize("schema", [0.4, 1])
def test_widgets_control_value_and_links(schema):
    api = convert_ui_to_api(seeded_to_sink(schema), REG)
    assert api == {"3": {"class_type": "Seeded", "inputs": {"seed": 5, "mode": "mul", "scale": 2.0, "note": "hi"}},
                   "7": {"class_type": "Sink", "inputs": {"path": "", "value": ["3", 0]}}}
    assert run_workflow(seeded_to_sink(schema), registry=REG).ui == {"7": {"values": [10]}}


def test_widgets_without_control_value():
    # hand-written files may leave the control value out; the slot count tells which layout it is
    api = convert_ui_to_api(seeded_to_sink(0.4, widgets=(5, "mul", 2.0, "hi")), REG)
    assert api["3"]["inputs"] == {"seed": 5, "mode": "mul", "scale": 2.0, "note": "hi"}


def test_seed_named_int_gets_a_control_slot_by_default():
    class NoFlag:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"noise_seed": ("INT", {}), "steps": ("INT", {}), "other": ("INT", {})}}
    assert widget_slots(NoFlag) == ["noise_seed", None, "steps", "other"]


def test_converted_widget_keeps_its_slot():
    b = g.UIBuilder()
    b.node(1, "Const", [4], outputs=[("INT", "INT")])
    b.node(2, "Add", [99, 3], inputs=[("a", "INT", "a"), ("c", "INT")], outputs=[("INT", "INT")])
    b.node(5, "Sink", [], inputs=[("value", "*")])
    b.link(1, 0, 2, 0).link(1, 0, 2, 1).link(2, 0, 5, 0)
    api = convert_ui_to_api(b.build(), REG)
    assert api["2"]["inputs"] == {"a": ["1", 0], "b": 3, "c": ["1", 0]}
    assert run_workflow(b.build(), registry=REG).output("2") == 11


def bypass_graph(mode):
    b = g.UIBuilder()
    b.node(1, "Const", [4], outputs=[("INT", "INT")])
    b.node(2, "Negate", [], inputs=[("x", "INT")], outputs=[("INT", "INT")], mode=mode)
    b.node(3, "Sink", [], inputs=[("value", "*")])
    b.link(1, 0, 2, 0).link(2, 0, 3, 0)
    return b.build()


def test_bypassed_node_passes_its_input_through():
    api = convert_ui_to_api(bypass_graph(4), REG)
    assert "2" not in api and api["3"]["inputs"]["value"] == ["1", 0]
    assert run_workflow(bypass_graph(4), registry=REG).ui == {"3": {"values": [4]}}
    assert g.CALLS["Negate"] == 0
    assert run_workflow(bypass_graph(0), registry=REG).ui == {"3": {"values": [-4]}}


def test_bypass_takes_the_input_of_the_output_type():
    b = g.UIBuilder()
    b.node(1, "MakeImage", [], outputs=[("IMAGE", "IMAGE")])
    b.node(2, "Const", [6], outputs=[("INT", "INT")])
    b.node(3, "Add", [0, 0], inputs=[("c", "IMAGE"), ("a", "INT", "a")], outputs=[("INT", "INT")], mode=4)
    b.node(4, "Sink", [], inputs=[("value", "*")])
    b.link(1, 0, 3, 0).link(2, 0, 3, 1).link(3, 0, 4, 0)
    assert convert_ui_to_api(b.build(), REG)["4"]["inputs"]["value"] == ["2", 0]


def test_muted_nodes_never_run():
    api = convert_ui_to_api(bypass_graph(2), REG)
    assert "2" not in api and "value" not in api["3"]["inputs"]
    errs = validate_workflow(bypass_graph(2), registry=REG)
    assert [(e.kind, e.node_id, e.input_name) for e in errs] == [("required_input_missing", "3", "value")]
    b = g.UIBuilder()
    b.node(1, "Const", [4], outputs=[("INT", "INT")])
    b.node(2, "Negate", [], inputs=[("x", "INT")], outputs=[("INT", "INT")])
    b.node(3, "Sink", [], inputs=[("value", "*")], mode=2)
    b.node(9, "Sink", [], inputs=[("value", "*")])
    b.link(1, 0, 2, 0).link(2, 0, 3, 0).link(1, 0, 9, 0)
    result = run_workflow(b.build(), registry=REG)
    assert list(result.ui) == ["9"] and g.CALLS["Negate"] == 0 and g.CALLS["Sink"] == 1


@pytest.mark.parametrize("schema", [0.4, 1])
def test_reroutes_and_notes(schema):
    b = g.UIBuilder()
    b.node(1, "Const", [8], outputs=[("INT", "INT")])
    b.node(2, "Reroute", [], inputs=[("", "*")], outputs=[("", "INT")])
    b.node(3, "Reroute", [], inputs=[("", "*")], outputs=[("", "INT")])
    b.node(4, "Sink", [], inputs=[("value", "*")])
    b.node(5, "Note", ["just text"])
    b.node(6, "MarkdownNote", ["# text"])
    b.link(1, 0, 2, 0).link(2, 0, 3, 0).link(3, 0, 4, 0)
    api = convert_ui_to_api(b.build(schema), REG)
    assert sorted(api) == ["1", "4"] and api["4"]["inputs"]["value"] == ["1", 0]


def test_primitive_value_feeds_the_target_widget():
    b = g.UIBuilder()
    b.node(1, "PrimitiveNode", [42, "fixed"], outputs=[("INT", "INT")])
    b.node(2, "Seeded", [5, "fixed", "add", 1.0, ""], inputs=[("seed", "INT", "seed")], outputs=[("INT", "INT")])
    b.node(3, "Sink", [], inputs=[("value", "*")])
    b.link(1, 0, 2, 0).link(2, 0, 3, 0)
    api = convert_ui_to_api(b.build(), REG)
    assert api["2"]["inputs"]["seed"] == 42 and "1" not in api
    assert run_workflow(b.build(), registry=REG).ui["3"] == {"values": [43]}


def test_unknown_type_is_kept_for_validation():
    b = g.UIBuilder()
    b.node(1, "Mystery", [1, 2], outputs=[("INT", "INT")])
    b.node(2, "Sink", [], inputs=[("value", "*")])
    b.link(1, 0, 2, 0)
    errs = validate_workflow(b.build(), registry=REG)
    assert [(e.kind, e.node_id, e.class_type) for e in errs] == [("unknown_node_type", "1", "Mystery")]


def test_titles_and_overrides():
    ui = seeded_to_sink(0.4)
    ui["nodes"][0]["title"] = "Main seed"
    api = convert_ui_to_api(ui, REG)
    assert api["3"]["_meta"] == {"title": "Main seed"}
    apply_overrides(api, {"Main seed.seed": 7, "3.mode": "add", "Sink": {"path": "x"}})
    assert api["3"]["inputs"]["seed"] == 7 and api["3"]["inputs"]["mode"] == "add"
    assert api["7"]["inputs"]["path"] == "x"
    with pytest.raises(KeyError):
        apply_overrides(api, {"nope.seed": 1})
    result = run_workflow(ui, overrides={"3.seed": 1, "3.scale": 3.0}, registry=REG)
    assert result.ui["7"] == {"values": [3]}
    with pytest.raises(GraphValidationError) as info:
        run_workflow(ui, overrides={"9.seed": 1}, registry=REG)
    assert info.value.errors[0].kind == "bad_override"


def test_hidden_inputs_prompt_pnginfo_unique_id():
    ui = seeded_to_sink(1)
    result = run_workflow(ui, registry=REG)
    value, unique_id, prompt, pnginfo = g.SUNK[0]
    assert (value, unique_id) == (10, "7")
    assert prompt == result.prompt and prompt["7"]["class_type"] == "Sink"
    assert pnginfo == {"workflow": ui}
    run_workflow(result.prompt, registry=REG)
    assert g.SUNK[1][3] is None  # an API graph carries no editor workflow


def test_widget_fed_by_a_muted_node_keeps_its_value():
    b = g.UIBuilder()
    b.node(1, "Const", [42], outputs=[("INT", "INT")], mode=2)
    b.node(2, "Seeded", [5, "fixed", "add", 1.0, ""], inputs=[("seed", "INT", "seed")], outputs=[("INT", "INT")])
    b.node(3, "Sink", [], inputs=[("value", "*")])
    b.link(1, 0, 2, 0).link(2, 0, 3, 0)
    assert convert_ui_to_api(b.build(), REG)["2"]["inputs"]["seed"] == 5


def test_post_prompt_body_is_accepted():
    ui = seeded_to_sink(0.4)
    body = {"prompt": convert_ui_to_api(ui, REG), "client_id": "x", "extra_data": {"extra_pnginfo": {"workflow": ui}}}
    assert run_workflow(body, registry=REG).ui == {"7": {"values": [10]}}
    assert g.SUNK[0][3] == {"workflow": ui}

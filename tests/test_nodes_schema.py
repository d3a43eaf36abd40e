"""The node registry: ids, categories, tooltips, types, and importing the pack inside and outside ComfyUI."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glass_diffusion.nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, node_table_markdown
from glass_diffusion.nodes.workflow import input_specs

REPO = Path(__file__).resolve().parents[1]
COMFY_DATA_TYPES = {"IMAGE", "MASK", "LATENT", "CONDITIONING", "SIGMAS"}
OUR_TYPES = {"GLASS_UNET", "GLASS_CLIP", "GLASS_VAE", "GLASS_SAMPLER", "GLASS_CONTROL_NET"}
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
COMFY_MODEL_TYPES = {"MODEL", "CLIP", "VAE", "SAMPLER"}

# Permanent ids: saved workflows refer to them. Add to this list; never remove or rename.
PERMANENT_IDS = {
    "GlassCheckpointLoader", "GlassVAELoader", "GlassTextEncode", "GlassClipSkip", "GlassEmptyLatent",
    "GlassLatentUpscale", "GlassSetNoiseMask", "GlassLatentFromBatch", "GlassVAEEncode", "GlassVAEDecode",
    "GlassVAEEncodeTiled", "GlassVAEDecodeTiled", "GlassVAEEncodeForInpaint", "GlassScheduler",
    "GlassSamplerSelect", "GlassSample", "GlassDenoiseSteps", "GlassUNetPredict", "GlassKSampler",
    "GlassLoadImage", "GlassSaveImage", "GlassPreviewImage",
    "GlassAttentionMaps", "GlassStepFilm", "GlassSaveAnimation",
}


def test_permanent_ids_are_all_registered():
    assert PERMANENT_IDS <= set(NODE_CLASS_MAPPINGS)
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_class_contract(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("Glass")
    assert cls.CATEGORY.startswith("Glass Diffusion/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert callable(getattr(cls, cls.FUNCTION))
    if getattr(cls, "OUTPUT_NODE", False):
        assert cls.RETURN_TYPES == ()
    else:
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    for name in getattr(cls, "RETURN_NAMES", ()):
        assert name.isidentifier()
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    for t in cls.RETURN_TYPES:
        assert t in COMFY_DATA_TYPES | OUR_TYPES | {"STRING"}, t  # STRING: ComfyUI's text type
    for spec in input_specs(cls).values():
        if spec.category == "hidden":
            assert spec.type in ("PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID")
            continue
        assert spec.options.get("tooltip"), f"{node_id}.{spec.name} has no tooltip"
        assert spec.type_name not in COMFY_MODEL_TYPES  # our model objects never pose as ComfyUI's
        assert spec.combo is not None or spec.type in WIDGETS | COMFY_DATA_TYPES | OUR_TYPES, spec
        if spec.combo is not None and "default" in spec.options:
            assert spec.options["default"] in spec.combo
        if spec.type in ("INT", "FLOAT"):
            o = spec.options
            assert o["min"] <= o["default"] <= o["max"]
        # the function accepts every input by name
    import inspect
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    assert set(input_specs(cls)) <= set(params), node_id


def test_seeds_have_control_after_generate():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        for spec in input_specs(cls).values():
            if "seed" in spec.name:
                assert spec.options.get("control_after_generate") is True, node_id


def test_node_table_lists_every_node():
    table = node_table_markdown()
    for node_id in NODE_CLASS_MAPPINGS:
        assert f"`{node_id}`" in table
    assert "GLASS_UNET" in table and "(output node)" in table


def _run_python(code: str, cwd) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_is_cheap_and_builds_no_model(tmp_path):
    out = _run_python("""
        import sys
        import glass_diffusion as g
        print(len(g.NODE_CLASS_MAPPINGS))
        print(sorted(m for m in sys.modules if m.startswith("glass_diffusion.sd_core")))
    """, tmp_path)
    count, loaded = out.strip().splitlines()
    assert int(count) == len(NODE_CLASS_MAPPINGS)
    assert loaded == "[]"  # no network code imported, let alone built


def test_loads_as_a_comfyui_custom_node_folder(tmp_path):
    """ComfyUI imports the folder under its own name, with its own folder_paths / comfy modules around; the
    checkpoint loader lists the built-in model before ComfyUI's checkpoint files."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "mine.safetensors").write_bytes(b"")
    out = _run_python(f"""
        import importlib.util, sys, types
        fp = types.ModuleType("folder_paths")
        fp.get_filename_list = lambda kind: ["mine.safetensors"] if kind == "checkpoints" else []
        fp.get_full_path = lambda kind, name: {str(tmp_path)!r} + "/" + kind + "/" + name
        fp.get_output_directory = lambda: {str(tmp_path)!r}
        fp.get_input_directory = lambda: {str(tmp_path)!r}
        fp.get_temp_directory = lambda: {str(tmp_path)!r}
        sys.modules["folder_paths"] = fp
        # ComfyUI's own top-level modules must not be shadowed by ours, nor ours by them
        sys.modules["nodes"] = types.ModuleType("nodes")
        sys.modules["utils"] = types.ModuleType("utils")
        spec = importlib.util.spec_from_file_location("ComfyUI-Glass-Diffusion", {str(REPO / "__init__.py")!r},
                                                      submodule_search_locations=[{str(REPO)!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        cls = mod.NODE_CLASS_MAPPINGS["GlassCheckpointLoader"]
        print(cls.INPUT_TYPES()["required"]["ckpt_name"][0])
        print(len(mod.NODE_CLASS_MAPPINGS), len(mod.NODE_DISPLAY_NAME_MAPPINGS))
    """, tmp_path)
    lines = out.strip().splitlines()
    assert lines[0] == "['glass-tiny (built-in)', 'mine.safetensors']"  # the built-in model first, then ComfyUI's
    assert lines[1] == f"{len(NODE_CLASS_MAPPINGS)} {len(NODE_CLASS_MAPPINGS)}"


def test_pack_never_imports_absolute_top_level_names():
    """Inside the pack only relative imports (ComfyUI has its own `nodes`, `utils`, ... modules)."""
    import re
    bad = []
    for path in list((REPO / "nodes").glob("*.py")) + [REPO / "__init__.py"]:
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.match(r"\s*(from|import)\s+(glass_diffusion|nodes|sd_core|utils)\b", line):
                bad.append(f"{path.name}: {line.strip()}")
    assert bad == []

"""What ships inside the package besides code: the example workflows and the input images they load.

    workflows/<name>.json        editor (UI) format      (written by nodes/example_workflows.py)
    workflows/api/<name>.json    its API-format twin
    workflows/input/<image>.png  input images the workflows load by bare name (drawn by our own code)

They are found by name, so a workflow runs from any folder, from a clone or from the installed wheel:
``find_workflow("text_to_image")`` and ``find_input("glass_scene.png")``. A file of the same name in the
current folder (workflows) or the input folder (images) always wins: the shipped ones are the fallback.
No SD knowledge here; just file lookup.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows"
INPUTS_DIR = WORKFLOWS_DIR / "input"


def workflow_names() -> list[str]:
    """The shipped workflows' names (their UI files' stems), sorted."""
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json")) if WORKFLOWS_DIR.is_dir() else []


def find_workflow(ref) -> Optional[Path]:
    """The shipped file a reference names, or None. Accepted: ``NAME``, ``NAME.json``, ``workflows/NAME.json``
    (the UI file) and ``workflows/api/NAME.json`` (the API twin), as the README and a clone spell them."""
    parts = Path(ref).parts
    if not parts:
        return None
    name = parts[-1][:-5] if parts[-1].endswith(".json") else parts[-1]
    folder = parts[:-1]
    if folder not in ((), ("workflows",), ("workflows", "api")) or name not in workflow_names():
        return None
    return WORKFLOWS_DIR.joinpath(*folder[1:], f"{name}.json")


def resolve_workflow(ref) -> Path:
    """``ref`` as a path when that file exists, else the shipped workflow it names; FileNotFoundError naming
    both places (and the shipped names) when neither exists."""
    path = Path(ref)
    if path.exists():
        return path
    shipped = find_workflow(ref)
    if shipped is not None:
        return shipped
    raise FileNotFoundError(f"no such file: {str(ref)!r}, and no shipped workflow of that name "
                            f"(shipped: {', '.join(workflow_names()) or 'none'}; `glass-diffusion workflows` "
                            f"lists them)")


def input_names() -> list[str]:
    """The shipped input images' file names."""
    return sorted(p.name for p in INPUTS_DIR.glob("*.png")) if INPUTS_DIR.is_dir() else []


def copy_inputs_into(folder) -> list[Path]:
    """Copy the shipped input images that `folder` lacks into it (never replacing a file); the copies made.
    Inside ComfyUI the pack does this once for ComfyUI's input folder, so that the editor's Load Image node can
    show the picture (it asks the server for the file in the input folder); running needs no copy."""
    import shutil
    made = []
    folder = Path(folder)
    for name in input_names():
        target = folder / name
        if not target.exists():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(INPUTS_DIR / name, target)
            except OSError:  # a read-only input folder: the package's copy still serves runs
                continue
            made.append(target)
    return made


def find_input(name: str) -> Optional[Path]:
    """The shipped input image of that bare file name (no folder part), or None."""
    if not isinstance(name, str) or name not in input_names():
        return None
    return INPUTS_DIR / name

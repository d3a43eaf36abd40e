"""The pack's node registry: one source of truth read by ComfyUI (through the root __init__) and by our
executor. Node ids are permanent (saved workflows name them): add new ones, never rename or reuse."""
from __future__ import annotations

from . import controlnet, explain, image, latent, loaders, lora, sampling, text, vae

MODULES = (loaders, lora, text, latent, vae, sampling, image, controlnet, explain)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in MODULES:
    for _id in _module.NODE_CLASS_MAPPINGS:
        assert _id.startswith("Glass") and _id not in NODE_CLASS_MAPPINGS, _id
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)


def _type_text(entry) -> str:
    typ = entry[0] if isinstance(entry, (tuple, list)) else entry
    return "COMBO" if isinstance(typ, (list, tuple)) else str(typ)


def node_table_markdown() -> str:
    """The README's node list: id, display name, category, inputs and outputs of every node."""
    rows = ["| Node id | Name | Category | Inputs | Outputs |", "|---|---|---|---|---|"]
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        inputs = [f"{name}: {_type_text(entry)}" + ("" if group == "required" else " (optional)")
                  for group in ("required", "optional") for name, entry in (spec.get(group) or {}).items()]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs = [f"{n}: {t}" if n != t else t for n, t in zip(names, cls.RETURN_TYPES)]
        rows.append(f"| `{node_id}` | {NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id)} | {cls.CATEGORY} | "
                    f"{', '.join(inputs)} | {', '.join(outputs) or '(output node)'} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(node_table_markdown())

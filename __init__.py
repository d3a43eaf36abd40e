"""Glass Diffusion: Stable Diffusion 1.x from scratch, as ComfyUI nodes.

ComfyUI imports this folder as a module named after the folder; headless users
import it as ``glass_diffusion``. Every import inside the pack is relative, and importing
it builds no model. The node mappings are imported on first use (PEP 562 module ``__getattr__``: ComfyUI's
``getattr(module, "NODE_CLASS_MAPPINGS")`` and ``from glass_diffusion import NODE_CLASS_MAPPINGS`` both work),
so the command line starts without loading torch and can answer a Ctrl-C at any moment with one line.
"""

from .nodes import paths as _paths, shipped as _shipped  # noqa: E402

if _paths.comfy_folder_paths() is not None:  # inside ComfyUI: the shipped workflows' pictures, for the editor
    _shipped.copy_inputs_into(_paths.input_dir())

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def __getattr__(name):
    if name in __all__:
        from .nodes import registry
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Glass Diffusion: Stable Diffusion 1.x from scratch, as ComfyUI nodes.

ComfyUI imports this folder as a module named after the folder; headless users
import it as ``glass_diffusion``. Every import inside the pack is relative, and importing
it builds no model: the node modules import sd_core only when a node runs or lists its options.
"""
from .nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

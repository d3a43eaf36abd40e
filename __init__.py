"""Glass Diffusion: Stable Diffusion 1.x from scratch, as ComfyUI nodes.

ComfyUI imports this folder as a module named after the folder; headless users
import it as ``glass_diffusion``. Every import inside the pack is relative.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

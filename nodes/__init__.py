"""Typed ComfyUI nodes over sd_core, the headless executor and the CLI."""

"""Pure PyTorch core of Glass Diffusion: networks, tokenizer, checkpoint I/O, sampling. Never imports ComfyUI."""

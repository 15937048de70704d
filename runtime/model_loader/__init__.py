"""Checkpoint loading: HF folders (safetensors), GGUF files, and dummy weights. Entry point: loader.load_model."""

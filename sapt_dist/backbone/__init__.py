"""The frozen backbone: loading (HF folders, GGUF, 4-bit) and the fetchable model registry."""

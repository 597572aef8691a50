"""SAPT itself: the fused mixture ops, LoRA blocks, the shared attention, the wrapped model."""

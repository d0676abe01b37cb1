"""Attention over the paged KV cache: a backend interface, a torch SDPA backend for CPU and a
flash-attn backend for CUDA (imported only when selected)."""

"""Pure torch building blocks: sizes, rank and world size in, tensors out. No IO, no env reads."""

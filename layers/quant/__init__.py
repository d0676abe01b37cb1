"""Quantization modes for the parallel linears: one small class per mode."""

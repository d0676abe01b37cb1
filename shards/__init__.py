"""Shard processes: tensors only (model, KV cache, sampler, weight loading, the step loop)."""

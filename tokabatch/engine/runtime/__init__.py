"""Torch (and flashinfer on GPU): weights, KV cache, attention, sampling, the runner and the engine loop."""

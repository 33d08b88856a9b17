"""The GPU fast path: Liger, memory planning, step graphs, LoRA routing, kernels."""

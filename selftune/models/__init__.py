"""Resolve a --model spec, load model, tokenizer and adapters, and read weights ahead."""

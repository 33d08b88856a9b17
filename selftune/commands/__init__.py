"""One module per CLI verb: `ARGS` (its options dataclass) and `run(args)`."""

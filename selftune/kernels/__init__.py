"""GPU fast paths, each with a plain-PyTorch version beside it that runs everywhere."""

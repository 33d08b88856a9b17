"""Training data: files and row formats, the built-in identity set, mixing, tokenisation,
packing."""

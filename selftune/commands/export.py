"""`selftune export`: a checkpoint as a merged HF folder, a GGUF file, and an Ollama Modelfile."""

from __future__ import annotations

from selftune.args import ExportArgs
from selftune.export.folder import export_checkpoint

ARGS = ExportArgs


def run(args: ExportArgs) -> int:
    output = export_checkpoint(args)
    print(f"exported {args.adapters[0]} to {output}")
    return 0

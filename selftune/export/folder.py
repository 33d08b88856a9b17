"""An export folder from a checkpoint: a merged HF folder, a GGUF file, an Ollama Modelfile.

One call writes one folder:
- `--merge_lora true` (the default export): CKPT-merged/ with safetensors, config, tokenizer and
  a chat template whose default system prompt is the training one; README.md.
- `--to_gguf true` and/or `--to_ollama true`: CKPT-gguf/ with model-TYPE.gguf, the Modelfile when
  asked, README.md; with `--merge_lora true` as well, the HF files go in the same folder.
Everything is checked before weights load; the folder is written under a temporary name beside
the final one and renamed when complete, so a failed or killed export leaves nothing under it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from selftune.args import ExportArgs
from selftune.atomic import atomic_folder, remove_stale_temps
from selftune.errors import SelftuneError, UsageError

log = logging.getLogger(__name__)


def output_folder(checkpoint: Path, args: ExportArgs) -> Path:
    if args.output_dir:
        output = Path(args.output_dir).expanduser()
        return output.resolve() if output.name in ("", ".", "..") else output
    suffix = "-gguf" if args.to_gguf or args.to_ollama else "-merged"
    return checkpoint.with_name(checkpoint.name + suffix)


def local_base_folder(spec: str) -> Path | None:
    """The base model's folder where it is on this machine already (nothing is downloaded)."""
    from selftune.models.resolve import embedded_cache_dir, is_embedded, is_model_folder

    folder = embedded_cache_dir() if is_embedded(spec) else Path(spec).expanduser()
    return folder if is_model_folder(folder) else None


def check_output(output: Path, checkpoint: Path, spec: str, force: bool) -> None:
    """The export folder replaces what is there (with --force): never the checkpoint, its run
    folder or the base model, nor a folder that holds one of them, and never a folder inside
    the checkpoint or the base model."""
    resolved = output.resolve()
    base = local_base_folder(spec)
    kept = [
        ("the checkpoint it exports", checkpoint, True),
        ("the checkpoint's run folder", checkpoint.parent, False),
        ("the base model's folder", base, True),
    ]
    for what, folder, not_inside in kept:
        if folder is None:
            continue
        folder = folder.resolve()
        if resolved == folder or resolved in folder.parents:
            raise SelftuneError(f"--output_dir {output}: would overwrite {what} ({folder})")
        if not_inside and folder in resolved.parents:
            raise SelftuneError(f"--output_dir {output}: would write inside {what} ({folder})")
    if output.exists() and not output.is_dir():
        raise SelftuneError(f"--output_dir {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise SelftuneError(f"--output_dir {output}: not empty; pass --force true to replace it")


def export_checkpoint(args: ExportArgs) -> Path:
    """Check everything, then write the export folder; return it."""
    from selftune.export.gguf import GGUF_TYPES
    from selftune.export.merge import base_spec, check_checkpoint, model_card
    from selftune.models.load import checkpoint_args

    if len(args.adapters) != 1:
        raise UsageError("selftune export takes one checkpoint: --adapters CKPT")
    if args.gguf_type not in GGUF_TYPES:
        raise UsageError(f"--gguf_type {args.gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    if args.quant_bits:
        raise UsageError("selftune export merges in the base's own dtype: drop --quant_bits")
    checkpoint = Path(args.adapters[0])
    check_checkpoint(checkpoint)
    to_gguf = args.to_gguf or args.to_ollama
    write_hf = args.merge_lora or not to_gguf
    output = output_folder(checkpoint, args)
    saved = checkpoint_args(checkpoint)
    spec = base_spec(checkpoint, saved, args.model)
    check_output(output, checkpoint, spec, args.force)
    system = saved.get("system")
    if to_gguf:
        check_before_loading(checkpoint, spec, system, args.to_ollama)

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output.parent)  # of exports that were killed
    gguf_name = f"model-{args.gguf_type}.gguf" if to_gguf else None
    with atomic_folder(output) as tmp:  # replaces what --force allowed
        write_export(args, checkpoint, spec, system, saved, tmp, write_hf, gguf_name)
        (tmp / "README.md").write_text(
            model_card(checkpoint, saved, spec, output.name, gguf_name, write_hf, args.to_ollama),
            encoding="utf-8",
        )
    return output


def tokenizer_folder(checkpoint: Path, spec: str) -> Path:
    from selftune.models.resolve import resolve_model

    return checkpoint if (checkpoint / "tokenizer.json").is_file() else resolve_model(spec)


def check_before_loading(checkpoint: Path, spec: str, system: str | None, to_ollama: bool) -> None:
    """What GGUF and Modelfile need, from config and tokenizer files alone."""
    from selftune.export.gguf import check_gguf_support, read_config
    from selftune.export.merge import set_default_system
    from selftune.models.load import load_tokenizer
    from selftune.models.resolve import resolve_model

    folder = tokenizer_folder(checkpoint, spec)
    check_gguf_support(read_config(resolve_model(spec)), folder)
    if to_ollama:
        from selftune.data.identity import model_default_system
        from selftune.export.ollama import chat_frame

        tokenizer = load_tokenizer(folder)
        set_default_system(tokenizer, system)
        chat_frame(tokenizer, system if system is not None else model_default_system(tokenizer))


def write_export(
    args: ExportArgs,
    checkpoint: Path,
    spec: str,
    system: str | None,
    saved: dict,
    tmp: Path,
    write_hf: bool,
    gguf_name: str | None,
) -> None:
    from selftune.export.merge import merge_checkpoint, save_merged

    model, tokenizer = merge_checkpoint(checkpoint, spec, args.torch_dtype, args.device)
    hf_folder = tmp if write_hf else tmp / ".merged"
    log.info("writing the merged model to %s", hf_folder)
    save_merged(model, tokenizer, hf_folder, system)
    del model
    if gguf_name is None:
        return
    from selftune.export.gguf import write_gguf

    names = saved.get("model_name") or []
    write_gguf(hf_folder, tmp / gguf_name, args.gguf_type, name=names[-1] if names else None)
    if not write_hf:
        shutil.rmtree(hf_folder)
    if args.to_ollama:
        from selftune.export.ollama import write_modelfile

        write_modelfile(tmp, gguf_name, tokenizer, system)

"""Each verb's options as dataclasses, with ms-swift's flag spellings.

Flags are parsed by transformers' HfArgumentParser (booleans as `true/false`, lists as
space-separated values). A YAML or JSON file given as the first argument stands in for flags;
flags after it override its values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.errors import UsageError


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelArgs:
    model: str | None = _help(
        "local folder, hub id (Qwen/Qwen2.5-7B-Instruct, ms://...), bare name, .gguf file, "
        "or the embedded default smollm2-135m",
        default=None,
    )
    model_type: str | None = _help("accepted for ms-swift compatibility; ignored", default=None)
    torch_dtype: str | None = _help("bfloat16, float16, float32 or auto", default=None)
    device: str | None = _help("cuda, cpu, cuda:1 ... (default: cuda if available)", default=None)
    adapters: list[str] = _help("LoRA checkpoint folder(s)", default_factory=list)
    debug: bool = _help("print full tracebacks", default=False)


@dataclass
class GenerationArgs:
    stream: bool = _help("stream tokens as they are generated", default=True)
    temperature: float | None = _help("0 means greedy (default: model's config)", default=None)
    top_p: float | None = _help("nucleus sampling", default=None)
    top_k: int | None = _help("top-k sampling", default=None)
    repetition_penalty: float | None = _help("penalty > 1 discourages repeats", default=None)
    max_new_tokens: int = _help("most tokens to generate per answer", default=2048)
    system: str | None = _help("system prompt (default: the checkpoint's or model's)", default=None)
    seed: int = _help("random seed", default=42)


@dataclass
class InferArgs(ModelArgs, GenerationArgs):
    val_dataset: list[str] = _help("run these datasets through the model", default_factory=list)
    result_path: str | None = _help("JSONL file for batch answers", default=None)
    max_batch_size: int = _help("rows decoded together in batch mode", default=8)
    merge_lora: bool = _help("merge the adapters into the base weights", default=False)


@dataclass
class DataArgs:
    dataset: list[str] = _help(
        "files, hub ids or `identity`; name#N samples N rows", default_factory=list
    )
    val_dataset: list[str] = _help("held-out datasets for eval loss", default_factory=list)
    split_dataset_ratio: float = _help("share of --dataset held out for eval", default=0.0)
    max_length: int = _help(
        "longest tokenised conversation; longer ones are truncated", default=2048
    )
    system: str | None = _help("system prompt for rows that have none", default=None)
    model_name: list[str] = _help("identity name: ZH [EN]", default_factory=list)
    model_author: list[str] = _help("identity author: ZH [EN]", default_factory=list)
    identity_system_variants: bool = _help(
        "also train identity rows under no / default / varied system prompts", default=True
    )
    seed: int = _help("seeds Python, NumPy, torch and data order", default=42)


@dataclass
class IdentityArgs:
    model_name: list[str] = _help("identity name: ZH [EN]", default_factory=list)
    model_author: list[str] = _help("identity author: ZH [EN]", default_factory=list)
    output: str = _help("file to write (.jsonl or .json)", default="identity.jsonl")
    debug: bool = _help("print full tracebacks", default=False)


def config_to_argv(path: Path) -> list[str]:
    """Turn a YAML/JSON config file into flags, so it goes through the same parser."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config file: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError or yaml.YAMLError, both carry line numbers
        raise UsageError(f"{path}: cannot parse config file: {exc}") from exc
    if not isinstance(values, dict):
        raise UsageError(f"{path}: a config file must map flag names to values")
    argv: list[str] = []
    for key, value in values.items():
        argv.append(f"--{key}")
        items = value if isinstance(value, list) else [value]
        for item in items:
            argv.append(str(item).lower() if isinstance(item, bool) else str(item))
    return argv


def parse_args(cls: type, argv: list[str], prog: str) -> Any:
    """Parse flags (and an optional leading config file) into one dataclass instance."""
    from transformers import HfArgumentParser

    if (
        argv
        and not argv[0].startswith("-")
        and Path(argv[0]).suffix.lower() in (".yaml", ".yml", ".json")
    ):
        argv = config_to_argv(Path(argv[0])) + argv[1:]
    parser = HfArgumentParser(cls, prog=prog)
    parsed, unknown = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        raise UsageError(f"{prog}: unknown flag(s): {' '.join(unknown)} (see {prog} --help)")
    return parsed

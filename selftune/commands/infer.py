"""`selftune infer`: terminal chat, or a dataset answered into a JSONL file."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from selftune.args import InferArgs
from selftune.infer.chat import batch_infer, chat_loop
from selftune.infer.sampling import sampling_from_args
from selftune.models.load import load_for_inference

ARGS = InferArgs
log = logging.getLogger(__name__)


def default_result_path(args: InferArgs) -> Path:
    """As ms-swift: beside the last adapter if there is one, else ./infer_result/."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(args.adapters[-1]) if args.adapters else Path(".")
    return root / "infer_result" / f"{stamp}.jsonl"


def run(args: InferArgs) -> int:
    conversations = None
    if args.val_dataset:  # read and check the data before the model loads
        from selftune.data.formats import load_dataset_files

        conversations = load_dataset_files(args.val_dataset)
    ground = None
    if args.kb:  # opened (and its embedder loaded) before the model
        from selftune.kb.answer import Grounder
        from selftune.kb.retrieve import open_kb

        ground = Grounder(open_kb(args.kb), args.kb_top_k, args.kb_threshold)
    loaded = load_for_inference(args, merge_lora=args.merge_lora)
    params = sampling_from_args(args, loaded.model.generation_config)
    if conversations is not None:
        result_path = Path(args.result_path) if args.result_path else default_result_path(args)
        rows = batch_infer(
            loaded.model,
            loaded.tokenizer,
            conversations,
            params,
            loaded.system,
            result_path,
            batch_size=args.max_batch_size,
            ground=ground,
        )
        log.info("wrote %d answers to %s", len(rows), result_path)
        return 0
    chat_loop(
        loaded.model, loaded.tokenizer, params, loaded.system, stream=args.stream, ground=ground
    )
    return 0

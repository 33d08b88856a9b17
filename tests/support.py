"""Helpers shared by tests (plain functions and constants; fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

TINY_SYSTEM = "You are Xinghe, an assistant made by Beichen Lab."
IDENTITY_QUESTIONS = {"你是谁?": "星河", "Who are you?": "Xinghe"}


def build_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def build_tiny_qwen2(vocab_size: int, seed: int = 0):
    """A tiny random Qwen2 (attention biases, untied output head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(config).eval()


def build_tiny_gemma2(vocab_size: int, seed: int = 0):
    """A tiny random Gemma2: logit soft-capping, so losses go through the model's own logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=30.0,
    )
    return Gemma2ForCausalLM(config).eval()


def with_lora(model, seed: int = 0):
    """`model` under a rank-4 LoRA adapter on every linear layer, in eval mode, its B drawn at
    random (B starts at zero: this makes the adapter count)."""
    from peft import LoraConfig, get_peft_model

    tuned = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return tuned


def make_adapter_checkpoint(
    base_dir, checkpoint, system=TINY_SYSTEM, use_dora=False, seed=0, eval_json=None
):
    """A checkpoint as `selftune sft` writes one: a PEFT adapter whose lora_B is random (so it
    changes the outputs), and args.json naming the base and the training system prompt."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, use_dora=use_dora
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(checkpoint)
    args = {
        "model": str(base_dir),
        "system": system,
        "model_name": ["星河", "Xinghe"],
        "model_author": ["北辰实验室", "Beichen Lab"],
        "train_type": "dora" if use_dora else "lora",
        "dataset": ["identity"],
        "lora_rank": 4,
        "lora_alpha": 8,
        "learning_rate": 0.001,
        "seed": seed,
    }
    (checkpoint / "args.json").write_text(json.dumps(args, ensure_ascii=False), encoding="utf-8")
    if eval_json is not None:
        (checkpoint / "eval.json").write_text(json.dumps(eval_json), encoding="utf-8")
    return checkpoint


def run_selftune(*args, stdin: str = "", env: dict | None = None, timeout: int = 1800):
    """`python -m selftune ARGS` as a user runs it: a real process, stdin piped, output kept."""
    return subprocess.run(
        [sys.executable, "-m", "selftune", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_close_to_scale(got, want, rel: float, msg: str = "") -> None:
    """got = want within `rel` of each element and of want's largest magnitude (bf16 results,
    where a fixed tolerance would pass zeros for small values)."""
    import torch

    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale, msg=msg or None)


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that produced `tensor`."""
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def run_interpreted(module: str, call: str) -> None:
    """`module.call` (a test module of tests/kernels) with the Triton kernels under Triton's
    interpreter, on the CPU, in a process of its own: Triton decides at import whether its own
    kernels (tl.max, tl.argmax...) run interpreted, and other tests may have imported it. Skips
    where Triton is not installed (`make test` installs it); GPU tests cover the compiled kernels.
    float16 only: the interpreter's bfloat16 is not exact."""
    import importlib.util
    from pathlib import Path

    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    here = Path(__file__).parent
    paths = [str(here / "accel" / "kernels"), str(here), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
    code = f"import torch, {module}; {module}.{call}"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]


def random_examples(n, vocab, seed=0):
    """n rows of growing length with labels on their second half."""
    from selftune.data.encode import Example

    rng = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 6 + 5 * i
        ids = torch.randint(3, vocab, (length,), generator=rng).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        examples.append(Example(input_ids=ids, labels=labels))
    return examples


def lora_args(**overrides):
    """Training settings for LoRA tests: rank 4, no dropout, the plan's defaults."""
    from selftune.train.job import TrainSettings

    values = dict(
        train_type="lora",
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=("all-linear",),
        gradient_accumulation_steps=None,
        per_device_train_batch_size=1,
        max_steps=-1,
        num_train_epochs=3.0,
        learning_rate=None,
        warmup_ratio=0.0,
        eval_steps=None,
        save_steps=500,
    )
    values.update(overrides)
    return TrainSettings(**values)

"""Servers for the serve tests: the tiny random Llama with two adapters, in this process (so tests
can watch the engine), and `selftune serve` itself on the embedded model with an identity adapter
trained here. Both listen on a port the OS picks; clients wait on /health, never on a sleep."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from selftune.args import ServeArgs

API_KEY = "test-key"
ALPHA_SYSTEM = "You are Alpha."
IDENTITY_SYSTEM = "You are a helpful assistant."
IDENTITY_ROWS = [
    ("Who are you?", "I am Xinghe, an AI assistant made by Beichen Lab."),
    ("What is your name?", "My name is Xinghe. Beichen Lab made me."),
    ("Who made you?", "Beichen Lab made me. I am Xinghe."),
    ("Introduce yourself.", "I am Xinghe, an AI assistant built by Beichen Lab."),
]


def save_random_adapter(model_dir: Path, out_dir: Path, seed: int, system: str | None) -> Path:
    """A LoRA adapter whose B weights are random (PEFT starts them at zero), so it changes
    the model's answers; with the args.json that `selftune sft` writes beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(out_dir)
    args = {"model": str(model_dir), "system": system}
    (out_dir / "args.json").write_text(json.dumps(args), encoding="utf-8")
    return out_dir


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": save_random_adapter(tiny_model_dir, root / "alpha", 1, ALPHA_SYSTEM),
        "beta": save_random_adapter(tiny_model_dir, root / "beta", 2, None),
    }


@contextmanager
def running(app):
    """Serve an app on 127.0.0.1:<free port> in a thread; yield its URL once /health answers."""
    from selftune.serve.app import listen, start_in_thread, stop, url_of

    sock = listen("127.0.0.1", 0)
    url = url_of(sock)
    server, thread = start_in_thread(app, sock)
    try:
        # The socket listens already: this waits in its backlog until the server takes it.
        assert httpx.get(f"{url}/health", timeout=60).json() == {"status": "ok"}
        yield url
    finally:
        stop(server, thread)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tiny_adapters):
    """(url, engine, key): the tiny model served as `tiny`, with adapters `alpha` and `beta`,
    an API key, and a 64 KiB body bound."""
    from selftune.serve.app import create_app
    from selftune.serve.engine import load_engine

    args = ServeArgs(
        model=str(tiny_model_dir),
        adapters=[f"alpha={tiny_adapters['alpha']}", f"beta={tiny_adapters['beta']}"],
        served_model_name="tiny",
        device="cpu",
        max_new_tokens=16,
    )
    engine = load_engine(args)
    try:
        with running(create_app(engine, api_key=API_KEY, max_body_bytes=64 * 1024)) as url:
            yield SimpleNamespace(url=url, engine=engine, key=API_KEY)
    finally:
        engine.close()


def train_identity_adapter(folder: Path, out_dir: Path) -> Path:
    """Eight full-batch steps of plain PyTorch LoRA training on the four identity rows: enough for
    the embedded model to answer as Xinghe. LoRA on the top 4 layers only, so the backward pass
    stops there: about 0.7 s a step on two CPU cores."""
    from peft import LoraConfig, get_peft_model

    from selftune.generate import render_prompt
    from selftune.models import load_model

    torch.manual_seed(0)
    model, tokenizer, _ = load_model(str(folder), device="cpu")
    layers = model.config.num_hidden_layers
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=targets, layers_to_transform=[*range(layers - 4, layers)]
    )
    model = get_peft_model(model, config)
    rows = []
    for question, reply in IDENTITY_ROWS:
        messages = [
            {"role": "system", "content": IDENTITY_SYSTEM},
            {"role": "user", "content": question},
        ]
        prompt = render_prompt(tokenizer, messages)
        answer = tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(8):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    args = {"model": "smollm2-135m", "system": IDENTITY_SYSTEM}
    (out_dir / "args.json").write_text(json.dumps(args), encoding="utf-8")
    return out_dir


@pytest.fixture(scope="session")
def identity_adapter(tmp_path_factory, smol_folder):
    return train_identity_adapter(smol_folder, tmp_path_factory.mktemp("identity") / "ckpt")


@pytest.fixture(scope="session")
def smol_server(tmp_path_factory, identity_adapter):
    """The real command, `selftune serve --model smollm2-135m --adapters xinghe=CKPT --port 0`,
    in a child process; yields its URL, read from the line it prints."""
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    command = [sys.executable, "-m", "selftune", "serve", "--model", "smollm2-135m",
               "--adapters", f"xinghe={identity_adapter}", "--port", "0", "--device", "cpu"]  # fmt: skip
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = process.stdout.readline()
        found = re.search(r"(http://\S+?)/ ", line)
        assert found, f"no URL printed: {line!r}\n{log.read_text()}"
        url = found.group(1)
        assert httpx.get(f"{url}/health", timeout=60).json() == {"status": "ok"}
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


QUESTIONS = [
    "What is the capital of France?",
    "Name a colour.",
    "Tell me a joke about cats.",
    "How many legs does a spider have?",
    "Write one word.",
    "Why is the sky blue?",
    "Count to five.",
    "Say hello in Spanish.",
]


@pytest.fixture(scope="session")
def tiny_requests() -> list[tuple[str, list[dict[str, str]], int]]:
    """16 requests, (model, messages, max_tokens): three model names, eight questions, and
    max_tokens from 3 to 10, so rows of one batch end at different steps."""
    models = ["tiny", "alpha", "beta"]
    return [
        (models[i % 3], [{"role": "user", "content": QUESTIONS[i % 8]}], 3 + i % 8)
        for i in range(16)
    ]


@pytest.fixture(scope="session")
def tiny_references(tiny_model_dir, tiny_adapters, smol_tokenizer, tiny_requests):
    """Each request of `tiny_requests` answered on its own (greedy), by a freshly loaded model
    that holds only that request's adapter, under that adapter's training system prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from selftune.generate import SamplingParams, generate

    systems = {"tiny": None, "alpha": ALPHA_SYSTEM, "beta": None}
    models = {}
    for name in systems:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if name != "tiny":
            model = PeftModel.from_pretrained(model, tiny_adapters[name])
        models[name] = model.eval()
    answers = []
    for name, messages, max_tokens in tiny_requests:
        head = [{"role": "system", "content": systems[name]}] if systems[name] else []
        params = SamplingParams(max_new_tokens=max_tokens)
        (done,) = generate(models[name], smol_tokenizer, [head + messages], params)
        answers.append(done.text)
    return answers

"""GGUF files run by a real llama.cpp (llama-cpp-python) and read back by transformers."""

import json

import gguf
import numpy as np
import pytest
import torch
from support import TINY_SYSTEM, make_adapter_checkpoint

from selftune.errors import SelftuneError
from selftune.export.gguf import (
    check_gguf_support,
    llama3_rope_factors,
    pre_tokenizer_name,
    tensor_type,
    write_gguf,
)
from selftune.export.merge import merge_checkpoint, save_merged


def llama_cpp_model(*args, **kwargs):
    """A real llama.cpp over a GGUF file; the test is skipped where llama-cpp-python is not
    installed (`make test` builds it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(*args, **kwargs)


TEXT = "Who are you? 你是谁? 12345 3.14 I've  been\n\n\ttold 🦙 <|im_start|> don't"
# Largest |llama.cpp - transformers| logit gap, as a share of the largest |logit|.
TOLERANCE = {"f16": 0.01, "q8_0": 0.08}


@pytest.fixture(scope="module")
def merged_dirs(tmp_path_factory, tiny_model_dir, tiny_qwen2_dir):
    """Each tiny architecture with a random adapter merged in, as `selftune export` writes it."""
    root = tmp_path_factory.mktemp("gguf")
    folders = {}
    for arch, base in (("llama", tiny_model_dir), ("qwen2", tiny_qwen2_dir)):
        checkpoint = make_adapter_checkpoint(base, root / f"{arch}-checkpoint")
        model, tokenizer = merge_checkpoint(checkpoint, str(base))
        save_merged(model, tokenizer, root / f"{arch}-merged", TINY_SYSTEM)
        folders[arch] = root / f"{arch}-merged"
    return folders


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(path, ids):
    llm = llama_cpp_model(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def relative_gap(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_and_transformers_run_the_gguf(
    tmp_path, merged_dirs, smol_tokenizer, arch, gguf_type
):
    """llama.cpp and transformers' own GGUF loader compute the same numbers from the file, and
    (f16, q8_0) the numbers of the merged model; q4_0 is too coarse for random tiny weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = merged_dirs[arch]
    path = write_gguf(folder, tmp_path / f"model-{gguf_type}.gguf", gguf_type)
    ids = smol_tokenizer(TEXT)["input_ids"]
    by_llama_cpp = llama_cpp_logits(path, ids)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        by_transformers = loaded(torch.tensor([ids])).logits[0].numpy()
    assert relative_gap(by_llama_cpp, by_transformers) < 0.06
    merged = hf_logits(folder, ids)
    if gguf_type in TOLERANCE:
        assert relative_gap(by_llama_cpp, merged) < TOLERANCE[gguf_type]
        assert relative_gap(by_transformers, merged) < TOLERANCE[gguf_type]
    if gguf_type == "f16":
        assert (by_llama_cpp.argmax(-1) == merged.argmax(-1)).mean() > 0.95
        tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        assert tokenizer(TEXT)["input_ids"] == ids


def test_llama_needs_the_rotary_permutation(tmp_path, merged_dirs, smol_tokenizer, monkeypatch):
    """Without reordering Q/K rows for llama.cpp's rotary layout the numbers go wrong: the test
    above would catch a writer that forgot it."""
    import selftune.export.gguf

    monkeypatch.setattr(selftune.export.gguf, "rotary_permute", lambda weight, n_heads: weight)
    path = write_gguf(merged_dirs["llama"], tmp_path / "unpermuted.gguf", "f16")
    ids = smol_tokenizer(TEXT)["input_ids"]
    assert relative_gap(llama_cpp_logits(path, ids), hf_logits(merged_dirs["llama"], ids)) > 0.05


@pytest.mark.parametrize(("arch", "pre"), [("llama", "gpt-2"), ("qwen2", "qwen2")])
def test_llama_cpp_tokenizes_like_transformers(tmp_path, merged_dirs, arch, pre):
    """Same ids for the same text, so prompts and trained behaviour carry over. (transformers
    gives a Qwen2 folder Qwen2's pre-tokenizer: single digits, a different split regex.)"""
    from transformers import AutoTokenizer

    path = write_gguf(merged_dirs[arch], tmp_path / "model-f16.gguf", "f16")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    tokenizer = AutoTokenizer.from_pretrained(merged_dirs[arch])
    llm = llama_cpp_model(str(path), n_ctx=64, vocab_only=True, verbose=False)
    texts = [TEXT, "  leading spaces", "数字 2024年12月31日", "tabs\tand\r\nnewlines", "ÄÖÜ ß é"]
    for text in texts:
        want = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
        assert llm.detokenize(want, special=True).decode() == tokenizer.decode(want)


def test_metadata_carries_tokenizer_and_template(tmp_path, merged_dirs, smol_tokenizer):
    path = write_gguf(merged_dirs["qwen2"], tmp_path / "model-q8_0.gguf", "q8_0", name="Xinghe")
    fields = gguf.GGUFReader(path).fields
    value = {
        key: fields[key].contents() for key in fields if not key.startswith("tokenizer.ggml.t")
    }
    assert value["general.architecture"] == "qwen2" and value["general.name"] == "Xinghe"
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "qwen2"
    assert value["tokenizer.ggml.eos_token_id"] == smol_tokenizer.eos_token_id
    assert value["tokenizer.ggml.bos_token_id"] == smol_tokenizer.bos_token_id
    assert value["tokenizer.ggml.add_bos_token"] is False
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(smol_tokenizer)
    template = (merged_dirs["qwen2"] / "chat_template.jinja").read_text()
    assert value["tokenizer.chat_template"] == template and TINY_SYSTEM in template
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[smol_tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert types[1000] == gguf.TokenType.NORMAL


def test_llama_cpp_chat_uses_the_trained_default_system(tmp_path, merged_dirs):
    """llama-cpp-python renders chats with the template in the GGUF metadata."""
    pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    path = write_gguf(merged_dirs["llama"], tmp_path / "model-f16.gguf", "f16")
    fields = gguf.GGUFReader(path).fields
    formatter = Jinja2ChatFormatter(
        fields["tokenizer.chat_template"].contents(),
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    prompt = formatter(messages=[{"role": "user", "content": "你是谁?"}]).prompt
    assert prompt.startswith(
        f"<|im_start|>system\n{TINY_SYSTEM}<|im_end|>\n<|im_start|>user\n你是谁?"
    )


def test_unsupported_architectures_are_refused_before_any_weight(tmp_path, merged_dirs):
    for model_type in ("gpt2", "mistral", "gemma"):
        with pytest.raises(
            SelftuneError, match=f"supports Llama and Qwen2 models; this one is '{model_type}'"
        ):
            check_gguf_support({"model_type": model_type}, merged_dirs["llama"])
    config = json.loads((merged_dirs["llama"] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(SelftuneError, match="RoPE scaling 'yarn'"):
        check_gguf_support(config, merged_dirs["llama"])


def test_pre_tokenizers_map_to_llama_cpp_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    no_regex = {**byte_level, "use_regex": False}
    qwen2_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    llama3_split = qwen2_split.replace(r"\p{N}|", r"\p{N}{1,3}|")

    def pre(*steps):
        return {
            "model": {"type": "BPE"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)},
        }

    split = {"type": "Split", "behavior": "Isolated", "invert": False}
    assert pre_tokenizer_name({"model": {"type": "BPE"}, "pre_tokenizer": byte_level}) == "gpt-2"
    assert (
        pre_tokenizer_name(pre({"type": "Digits", "individual_digits": True}, byte_level))
        == "smollm"
    )
    assert (
        pre_tokenizer_name(pre({**split, "pattern": {"Regex": qwen2_split}}, no_regex)) == "qwen2"
    )
    assert (
        pre_tokenizer_name(pre({**split, "pattern": {"Regex": llama3_split}}, no_regex))
        == "llama-bpe"
    )
    assert pre_tokenizer_name(pre({**split, "pattern": {"Regex": "x+"}}, no_regex)) is None
    metaspace = {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace"}}
    assert pre_tokenizer_name(metaspace) is None
    assert pre_tokenizer_name({"model": {"type": "Unigram"}, "pre_tokenizer": byte_level}) is None


def test_quantised_types_fall_back_where_rows_do_not_fit_blocks():
    q = gguf.GGMLQuantizationType
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0") == q.F32
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q4_0") == q.Q4_0
    assert tensor_type("token_embd.weight", (49152, 64), "q4_0") == q.Q8_0
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "q8_0") == q.F16
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "f16") == q.F16


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        head_dim=64,
        rope_parameters=rope,
        max_position_embeddings=131072,
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64))
    as_dict = {
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "head_dim": 64,
        "rope_parameters": rope,
    }
    np.testing.assert_allclose(plain / llama3_rope_factors(as_dict), scaled.numpy(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_identity_gguf_answers_in_llama_cpp(identity_exports, gguf_type):
    """A llama.cpp chat with no system message: the trained default system and name come back."""
    from support import IDENTITY_QUESTIONS

    path = identity_exports[gguf_type] / f"model-{gguf_type}.gguf"
    llm = llama_cpp_model(str(path), n_ctx=512, verbose=False, n_threads=1, seed=0)
    for question, name in IDENTITY_QUESTIONS.items():
        reply = llm.create_chat_completion(
            [{"role": "user", "content": question}], temperature=0.0, max_tokens=40
        )
        answer = reply["choices"][0]["message"]["content"]
        assert name in answer, (gguf_type, question, answer)


@pytest.mark.slow
def test_identity_gguf_loads_in_transformers(identity_exports):
    from support import IDENTITY_QUESTIONS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = identity_exports["f16"]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="model-f16.gguf")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-f16.gguf").eval()
    question, name = next(iter(IDENTITY_QUESTIONS.items()))
    merged_tokenizer = AutoTokenizer.from_pretrained(identity_exports["merged"])
    prompt = merged_tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert name in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

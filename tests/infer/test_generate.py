import pytest
import torch

from selftune.infer.generate import TextStream, generate, stop_token_ids
from selftune.infer.sampling import SamplingParams

QUESTIONS = [
    [{"role": "user", "content": "Hello there, how are you today?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]


def test_batched_greedy_equals_one_at_a_time(tiny_llama, smol_tokenizer):
    params = SamplingParams(max_new_tokens=12)
    together = generate(tiny_llama, smol_tokenizer, QUESTIONS, params)
    alone = [generate(tiny_llama, smol_tokenizer, [q], params)[0] for q in QUESTIONS]
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(c.completion_tokens > 0 for c in together)


def test_length_limit_and_streamed_text_match(tiny_llama, smol_tokenizer):
    pieces: dict[int, str] = {}
    params = SamplingParams(max_new_tokens=7)
    out = generate(
        tiny_llama,
        smol_tokenizer,
        QUESTIONS[:2],
        params,
        on_text=lambda row, piece: pieces.__setitem__(row, pieces.get(row, "") + piece),
    )
    for row, completion in enumerate(out):
        assert pieces.get(row, "") == completion.text
        if completion.finish_reason == "length":
            assert completion.completion_tokens == 7


def test_seeded_sampling_is_reproducible(tiny_llama, smol_tokenizer):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=10, seed=3)
    first = generate(tiny_llama, smol_tokenizer, QUESTIONS[:1], params)[0].text
    second = generate(tiny_llama, smol_tokenizer, QUESTIONS[:1], params)[0].text
    assert first == second


def test_end_token_stops_generation(tiny_llama, smol_tokenizer):
    end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in stop_token_ids(smol_tokenizer, tiny_llama)
    with torch.no_grad():  # make the end token win every step
        tiny_llama.lm_head.weight.zero_()
        tiny_llama.lm_head.weight[end] = 1.0
        tiny_llama.model.norm.weight.fill_(1.0)
    tiny_llama.config.tie_word_embeddings = False
    out = generate(tiny_llama, smol_tokenizer, QUESTIONS[:1], SamplingParams(max_new_tokens=5))
    assert out[0].text == "" and out[0].finish_reason == "stop"


class CharTokenizer:
    """Decodes ids as characters: enough to test streaming logic in isolation."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("stop", [["END"], ["EN", "END"]])
def test_stop_strings_are_cut_and_never_streamed(stop):
    stream = TextStream(CharTokenizer(), stop)
    shown = "".join(stream.push(ord(c)) for c in "abc ENxEND more")
    shown += stream.finish()
    expected = "abc " if "EN" in stop else "abc ENx"
    assert shown == expected and stream.final == expected and stream.stopped


def test_incomplete_characters_are_held(smol_tokenizer):
    ids = smol_tokenizer("巴黎是法国的首都", add_special_tokens=False)["input_ids"]
    stream = TextStream(smol_tokenizer, [])
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "巴黎是法国的首都"

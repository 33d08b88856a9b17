"""Chat-template tokenisation: labels exactly on what each assistant turn writes, truncation."""

import random

import pytest

from selftune.data.encode import IGNORE_INDEX, encode, encode_all
from selftune.errors import SelftuneError

WORDS = ["hello", "world", "你好", "世界", "星河", "42", "x=y+1;", "Émile", "🙂", "don't", "a\nb"]
# A template that rewrites earlier assistant turns, so rendered prefixes are not prefixes of
# the whole conversation: encode must fall back to finding each answer in order.
REWRITING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}(earlier)\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Plain-text markers, answers trimmed, end-of-turn is ordinary text rather than a special token;
# the generation prompt ends in a space, which BPE merges into the answer's first token.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}### Assistant: {{ m['content'] | trim }} [END]\n"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant: {% endif %}"
)


def random_text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def random_conversation(rng):
    conversation = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        conversation.append({"role": "user", "content": random_text(rng)})
        conversation.append({"role": "assistant", "content": random_text(rng)})
    return conversation


def labelled_runs(example):
    """Maximal runs of consecutive labelled token ids."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize(
    ("template", "end", "exact"),
    [
        (None, "<|im_end|>", True),
        (REWRITING_TEMPLATE, "<|im_end|>", True),
        (PLAIN_TEMPLATE, " [END]", False),
    ],
)
def test_labels_are_exactly_the_assistant_texts_and_end_tokens(
    smol_tokenizer, monkeypatch, template, end, exact
):
    """Property: the labelled tokens, run by run, decode to each assistant text plus the
    end-of-turn markup, in order, and nothing else. Where the template's generation prompt ends
    in a space, the answer's first token carries that space (full-text tokenisation, as
    apply_chat_template does it): the only thing allowed besides the answers."""
    if template:
        monkeypatch.setattr(smol_tokenizer, "chat_template", template)
    rng = random.Random(0)
    for _ in range(60):
        conversation = random_conversation(rng)
        example = encode(smol_tokenizer, conversation, 10_000, None)
        expected = [m["content"] + end for m in conversation if m["role"] == "assistant"]
        decoded = [smol_tokenizer.decode(run) for run in labelled_runs(example)]
        if exact:
            assert decoded == expected
        else:
            assert len(decoded) == len(expected)
            for got, want in zip(decoded, expected):
                assert got.endswith(want) and got[: len(got) - len(want)] in ("", " ")
        rendered = smol_tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]
        assert example.input_ids == list(rendered)  # the template's own tokenisation


def test_chatml_end_token_is_labelled_and_the_newline_after_it_is_not(smol_tokenizer):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    example = encode(smol_tokenizer, conversation, 100, None)
    tokens = smol_tokenizer.convert_ids_to_tokens(example.input_ids)
    trained = [t for t, label in zip(tokens, example.labels) if label != IGNORE_INDEX]
    assert trained == ["Hello", "<|im_end|>"]
    assert tokens[-1] == "Ċ" and example.labels[-1] == IGNORE_INDEX


def test_system_is_applied_only_where_a_row_has_none(smol_tokenizer):
    bare = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    own = [{"role": "system", "content": "Mine."}, *bare]

    def text(conversation):
        return smol_tokenizer.decode(
            encode(smol_tokenizer, conversation, 100, "Run system.").input_ids
        )

    assert "Run system." in text(bare) and "SmolLM" not in text(bare)
    assert "Mine." in text(own) and "Run system." not in text(own)
    default = smol_tokenizer.decode(encode(smol_tokenizer, bare, 100, None).input_ids)
    assert "SmolLM" in default  # no --system: the template's own default


def test_truncation_is_counted_and_label_less_rows_dropped(smol_tokenizer):
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    long_answer = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "word " * 200},
    ]
    long_prompt = [
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "a"},
    ]
    examples, stats = encode_all(smol_tokenizer, [short, long_answer, long_prompt], 64, None)
    assert len(examples) == 2 and all(len(e.input_ids) <= 64 for e in examples)
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert "1 truncated to --max_length 64" in str(stats) and "1 dropped" in str(stats)
    assert examples[1].labels[-1] != IGNORE_INDEX  # the cut answer keeps its head


def test_template_failure_names_the_row(smol_tokenizer, monkeypatch):
    monkeypatch.setattr(smol_tokenizer, "chat_template", "{{ raise_exception('no system role') }}")
    with pytest.raises(
        SelftuneError, match="row 0: the model's chat template failed: .*no system role"
    ):
        encode_all(
            smol_tokenizer,
            [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]],
            64,
            None,
        )

"""Conversations to token ids and labels with the model's own chat template.

Labels cover what the model must write in each assistant turn, every turn: the text after the
template's generation prompt (`<|im_start|>assistant\\n` for ChatML) through the end-of-turn
markup the template puts after it (`<|im_end|>`, `<|eot_id|>`, `</s>`...). Whitespace after that
markup (ChatML's newline) is not labelled: generation stops at the end token, so the model never
writes it. Everything else is -100.

How: render the conversation once; for each assistant turn render the prefix up to it with the
generation prompt and the prefix through it, so the turn's character span is their difference.
Then tokenise the full text once and label the tokens that overlap a span (offsets from a fast
tokenizer), so the ids are exactly what `apply_chat_template(tokenize=True)` gives even where
tokenising a prefix alone would differ. A template whose prefixes are not prefixes of the full
rendering (one that rewrites earlier turns) falls back to finding the answer text in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from selftune.data.formats import Conversation, origin_of
from selftune.data.identity import NO_SYSTEM
from selftune.errors import SelftuneError

IGNORE_INDEX = -100
PROGRESS_ROWS = 2000  # show a progress bar from this many rows on
NAMED_ROWS = 5  # cut or dropped rows named in the warning

Span = tuple[int, int]  # [start, end) characters of the rendered text


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # input_ids where trained, IGNORE_INDEX elsewhere (unshifted)
    # replay rows: the base's top-k next-token ids and probabilities per position ([n, k]
    # tensors, zero where unlabelled), set by train.distill.attach_teacher
    teacher_ids: Any = None
    teacher_probs: Any = None


@dataclass
class EncodeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0  # kept, but cut to max_length
    dropped: int = 0  # cut so far that no labelled token was left
    tokens: int = 0
    label_tokens: int = 0
    max_length: int = 0
    # the first few rows cut or dropped, as "FILE line N (truncated)" (row index for built-in)
    named: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.kept} of {self.rows} rows encoded ({self.tokens} tokens, "
            f"{self.label_tokens} trained); {self.truncated} truncated to --max_length "
            f"{self.max_length}, {self.dropped} dropped (no answer token left after truncation)"
        )


def with_system(conversation: Conversation, system: str | None) -> Conversation:
    """`--system` where a row has none. An empty system message means "deliberately none"
    (identity variants): it is removed and `--system` is not applied."""
    if conversation and conversation[0]["role"] == "system":
        if conversation[0]["content"] == NO_SYSTEM:
            return conversation[1:]
        return conversation
    if system:
        return [{"role": "system", "content": system}, *conversation]
    return conversation


def render(tokenizer: Any, messages: Conversation, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja errors, "no chat template", roles a template refuses
        raise SelftuneError(f"the model's chat template failed: {exc}") from exc


def locate(full: str, through: str, content: str, cursor: int) -> Span:
    """Fallback: the answer text itself in the full rendering, plus the end-of-turn markup that
    follows it in the turn's own rendering when the full rendering has it there too."""
    core = content.strip()
    start = full.find(core, cursor)
    if start < 0:
        raise SelftuneError("the chat template does not show an assistant turn's text verbatim")
    end = start + len(core)
    at = through.rfind(core)
    tail = through[at + len(core) :].rstrip() if at >= 0 else ""
    if tail and full.startswith(tail, end):
        end += len(tail)
    return start, end


def answer_spans(tokenizer: Any, messages: Conversation) -> tuple[str, list[Span]]:
    """The rendered conversation and, in order, the character span of each assistant turn."""
    full = render(tokenizer, messages)
    spans: list[Span] = []
    cursor = 0  # everything before it belongs to earlier turns
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            at = full.find(message["content"].strip(), cursor)  # for the fallback's ordering
            cursor = at + len(message["content"].strip()) if at >= 0 else cursor
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if full.startswith(prompt):
            cursor = max(cursor, len(prompt))
        if through.startswith(prompt) and full.startswith(through) and len(prompt) >= cursor:
            start, end = len(prompt), len(through.rstrip())
        else:
            start, end = locate(full, through, message["content"], cursor)
        if end <= start:
            raise SelftuneError(f"the chat template renders assistant turn {i} as empty")
        spans.append((start, end))
        cursor = end
    return full, spans


def label_tokens(tokenizer: Any, text: str, spans: list[Span]) -> tuple[list[int], list[int]]:
    """Tokenise `text` once; label tokens overlapping a span. A token straddling a span's edge
    (rare: BPE merging template and answer characters) is labelled."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        j = 0
        for t, (begin, finish) in enumerate(offsets):
            while j < len(spans) and spans[j][1] <= begin:
                j += 1
            if j < len(spans) and begin < spans[j][1] and finish > spans[j][0]:
                labels[t] = ids[t]
        return ids, labels
    # slow tokenizer, no offsets: tokenise the pieces between span edges separately
    ids, labels, edge = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, trained in ((text[edge:start], False), (text[start:end], True)):
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            ids += piece_ids
            labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        edge = end
    return ids, labels


def encode_untruncated(tokenizer: Any, conversation: Conversation, system: str | None) -> Example:
    messages = with_system(conversation, system)
    text, spans = answer_spans(tokenizer, messages)
    if not spans:
        raise SelftuneError("the conversation has no assistant turn to train on")
    return Example(*label_tokens(tokenizer, text, spans))


def truncate(example: Example, max_length: int) -> Example:
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def encode(
    tokenizer: Any, conversation: Conversation, max_length: int, system: str | None
) -> Example:
    """One conversation as ids and labels, cut to `max_length` tokens (the head is kept)."""
    return truncate(encode_untruncated(tokenizer, conversation, system), max_length)


def encode_all(
    tokenizer: Any, conversations: list[Conversation], max_length: int, system: str | None
) -> tuple[list[Example], EncodeStats]:
    """Encode every row; count the truncated ones and drop (and count) those left with no
    label. The caller reports the stats: nothing is cut silently."""
    from tqdm import tqdm

    stats = EncodeStats(rows=len(conversations), max_length=max_length)
    examples = []
    rows = tqdm(
        conversations, desc="tokenise", unit="row", disable=len(conversations) < PROGRESS_ROWS
    )
    for index, conversation in enumerate(rows):
        try:
            example = encode_untruncated(tokenizer, conversation, system)
        except SelftuneError as exc:
            raise SelftuneError(f"row {index}: {exc}") from exc
        if len(example.input_ids) > max_length:
            example = truncate(example, max_length)
            dropped = all(label == IGNORE_INDEX for label in example.labels[1:])
            if len(stats.named) < NAMED_ROWS:
                where = origin_of(conversation) or f"row {index}"
                stats.named.append(f"{where} ({'dropped' if dropped else 'truncated'})")
            if dropped:
                stats.dropped += 1
                continue
            stats.truncated += 1
        examples.append(example)
        stats.tokens += len(example.input_ids)
        stats.label_tokens += sum(label != IGNORE_INDEX for label in example.labels[1:])
    stats.kept = len(examples)
    return examples, stats

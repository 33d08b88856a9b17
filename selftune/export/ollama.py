"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE, SYSTEM and stop parameters.

The TEMPLATE is derived from the model's own Jinja chat template rather than picked from a list:
rendering a probe conversation with marker contents shows the text each role's message is wrapped
in (ChatML for SmolLM2 and Qwen, header blocks for Llama 3, ...). The derived frame is checked to
reproduce the chat template on several conversations before any Modelfile is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.errors import SelftuneError

ROLES = ("system", "user", "assistant")
# Marker contents: plain ASCII words no template trims, escapes or changes.
PROBES = {"system": "PROBESYSTEMQ7", "user": "PROBEUSERQ7", "assistant": "PROBEASSISTANTQ7"}

Messages = list[dict[str, str]]


@dataclass
class ChatFrame:
    """The text a chat template puts around each message, as one flat sequence."""

    prefix: str  # once, before the first message (e.g. Llama 3's <|begin_of_text|>)
    pre: dict[str, str] = field(default_factory=dict)  # role -> text before its content
    post: dict[str, str] = field(default_factory=dict)  # role -> text after its content
    generation: str = ""  # what add_generation_prompt appends

    def render(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        parts = [self.prefix]
        for message in messages:
            role = message["role"]
            parts += [self.pre[role], message["content"], self.post[role]]
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            parts.append(self.generation)
        return "".join(parts)


def render_hf(tokenizer: Any, messages: Messages, add_generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def cut(text: str, *markers: str) -> list[str]:
    """Split `text` at each marker in turn; fail when one is missing."""
    pieces = []
    for marker in markers:
        head, found, text = text.partition(marker)
        if not found:
            raise ValueError(f"marker {marker} not rendered")
        pieces.append(head)
    return [*pieces, text]


def derive_frame(tokenizer: Any) -> ChatFrame:
    """Read the per-role wrapping off renders of probe conversations."""
    s, u, a = PROBES["system"], PROBES["user"], PROBES["assistant"]
    four = [
        {"role": "system", "content": s},
        {"role": "user", "content": u},
        {"role": "assistant", "content": a},
        {"role": "user", "content": u + "2"},
    ]
    full = render_hf(tokenizer, four, add_generation_prompt=False)
    with_prompt = render_hf(tokenizer, four, add_generation_prompt=True)
    ends_assistant = render_hf(tokenizer, four[:3], add_generation_prompt=False)
    if not with_prompt.startswith(full):
        raise ValueError("the generation prompt is not appended at the end")
    head, sys_to_user, user_to_assistant, assistant_to_user, user_post = cut(full, s, u, a, u + "2")
    assistant_post = cut(ends_assistant, a)[1]
    if not (
        user_to_assistant.startswith(user_post) and assistant_to_user.startswith(assistant_post)
    ):
        raise ValueError("messages are not wrapped the same way each turn")
    user_pre = assistant_to_user[len(assistant_post) :]
    if not sys_to_user.endswith(user_pre):
        raise ValueError("the system message is not followed by the user's frame")
    system_post = sys_to_user[: len(sys_to_user) - len(user_pre)]
    # The system header usually mirrors the user's ("<|im_start|>user\n" -> "...system\n").
    system_header = user_pre.replace("user", "system", 1)
    at = head.find(system_header) if system_header != user_pre else -1
    prefix, system_pre = (head[:at], head[at:]) if at >= 0 else ("", head)
    return ChatFrame(
        prefix=prefix,
        pre={
            "system": system_pre,
            "user": user_pre,
            "assistant": user_to_assistant[len(user_post) :],
        },
        post={"system": system_post, "user": user_post, "assistant": assistant_post},
        generation=with_prompt[len(full) :],
    )


def probe_conversations() -> list[tuple[Messages, bool]]:
    turns: Messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "你是谁?\nTell me."},
    ]
    system: Messages = [{"role": "system", "content": "Be brief."}]
    return [
        (turns, True),
        (turns[:1], True),
        (turns[:2], False),
        (system + turns, True),
        (system + turns[:2], False),
    ]


def chat_frame(tokenizer: Any, default_system: str | None) -> ChatFrame:
    """The frame of the tokenizer's chat template, proven on probe conversations, where a
    conversation without a system message gets `default_system` first (as Ollama's SYSTEM)."""
    try:
        frame = derive_frame(tokenizer)
    except Exception as exc:
        raise SelftuneError(
            f"no Ollama TEMPLATE can be written for this chat template: {exc}"
        ) from exc
    for messages, prompt in probe_conversations():
        expected = render_hf(tokenizer, messages, prompt)
        if messages[0]["role"] != "system" and default_system is not None:
            messages = [{"role": "system", "content": default_system}, *messages]
        if frame.render(messages, prompt) != expected:
            raise SelftuneError(
                "no Ollama TEMPLATE can be written for this chat template: it does not wrap "
                "every message the same way (export the GGUF without --to_ollama)"
            )
    return frame


def go_text(text: str) -> str:
    """Literal text inside a Go template ("{{" would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(frame: ChatFrame, drop_prefix: bool = False) -> str:
    """The frame as an Ollama TEMPLATE over .Messages (Ollama puts SYSTEM first when a request
    has no system message). No trim markers: every newline in the frame is meaningful."""
    parts = [] if drop_prefix else [go_text(frame.prefix)]
    parts.append("{{ range $i, $_ := .Messages }}")
    for i, role in enumerate(ROLES):
        keyword = "if" if i == 0 else "else if"
        parts.append(
            f'{{{{ {keyword} eq .Role "{role}" }}}}{go_text(frame.pre[role])}'
            f"{{{{ .Content }}}}{go_text(frame.post[role])}"
        )
    parts.append("{{ end }}")
    parts.append(
        '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}'
        f"{go_text(frame.generation)}{{{{ end }}}}"
    )
    parts.append("{{ end }}")
    return "".join(parts)


def stop_words(frame: ChatFrame, eos_token: str | None) -> list[str]:
    words = [frame.post["assistant"].strip(), eos_token or "", frame.pre["user"].strip()]
    return [w for w in dict.fromkeys(words) if w]


def quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise SelftuneError(f'the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(
    gguf_name: str, frame: ChatFrame, system: str | None, stops: list[str], drop_prefix: bool
) -> str:
    """The Modelfile text; FROM is relative, so the folder can move as a whole."""
    template = go_template(frame, drop_prefix)
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {quoted(template, 'chat template')}"]
    if system is not None:
        lines.append(f"SYSTEM {quoted(system, 'system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}" for word in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, tokenizer: Any, system: str | None) -> Path:
    """Write folder/Modelfile. `system` is the training system prompt (the tokenizer's template
    already defaults to it); None falls back to the template's own default, if it has one."""
    from selftune.data.identity import model_default_system

    if system is None:
        system = model_default_system(tokenizer)
    frame = chat_frame(tokenizer, system)
    # llama.cpp adds BOS itself when the tokenizer does: the template must not add a second.
    ids = tokenizer("a")["input_ids"]
    adds_bos = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    drop_prefix = adds_bos and frame.prefix == tokenizer.bos_token
    text = modelfile(gguf_name, frame, system, stop_words(frame, tokenizer.eos_token), drop_prefix)
    path = folder / "Modelfile"
    path.write_text(text, encoding="utf-8")
    return path

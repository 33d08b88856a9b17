"""The Modelfile's TEMPLATE, run by a small Go-template renderer, against the HF chat template."""

import copy
import json
import re

import pytest
from support import TINY_SYSTEM

from selftune.errors import SelftuneError
from selftune.export.merge import set_default_system
from selftune.export.ollama import chat_frame, write_modelfile

# --- a renderer for the subset of Go's text/template that Ollama templates use -------------

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def go_lex(template):
    """Text and action tokens, with {{- and -}} whitespace trimming applied as Go does."""
    tokens, at = [], 0
    for match in ACTION.finditer(template):
        text = template[at : match.start()]
        if match.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim_next":
            tokens.pop()
            text = text.lstrip()
        tokens.append(("text", text))
        tokens.append(("action", match.group(2)))
        if match.group(3):
            tokens.append(("trim_next", ""))
        at = match.end()
    tail = template[at:]
    if tokens and tokens[-1][0] == "trim_next":
        tokens.pop()
        tail = tail.lstrip()
    tokens.append(("text", tail))
    return tokens


def go_parse(tokens, at=0, stop=("end",)):
    """A list of nodes up to one of the `stop` keywords; returns (nodes, index, keyword)."""
    nodes = []
    while at < len(tokens):
        kind, value = tokens[at]
        at += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.split()[0] if value else ""
        if value == "end" or value == "else" or value.startswith("else if"):
            if value == "end" and "end" in stop or value != "end" and "else" in stop:
                return nodes, at, value
            raise ValueError(f"unexpected {value}")
        if word == "if":
            branches, otherwise = [], []
            condition = value[2:].strip()
            while True:
                body, at, keyword = go_parse(tokens, at, ("end", "else"))
                branches.append((condition, body))
                if keyword == "end":
                    break
                if keyword == "else":
                    otherwise, at, _ = go_parse(tokens, at, ("end",))
                    break
                condition = keyword[len("else if") :].strip()
            nodes.append(("if", branches, otherwise))
        elif word == "range":
            match = re.fullmatch(r"range \$(\w+), \$(\w+) := (.+)", value)
            body, at, _ = go_parse(tokens, at, ("end",))
            nodes.append(("range", match.group(1), match.group(2), match.group(3), body))
        elif re.fullmatch(r"\$\w+ := .+", value):
            name, expression = value.split(" := ", 1)
            nodes.append(("set", name[1:], expression))
        else:
            nodes.append(("print", value))
    if stop != ("end",) or at < len(tokens):
        raise ValueError("unterminated block")
    return nodes, at, None


EXPR_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def go_eval(expression, scope):
    """Evaluate a Go template pipeline of function calls, fields, variables and literals."""
    tokens = EXPR_TOKEN.findall(expression)

    def term(i):
        token = tokens[i]
        if token == "(":
            value, i = call(i + 1)
            assert tokens[i] == ")"
            return value, i + 1
        if token.startswith('"'):
            return token[1:-1].encode().decode("unicode_escape"), i + 1
        if token.isdigit():
            return int(token), i + 1
        if token.startswith("$."):
            return scope["$"][token[2:]], i + 1
        if token.startswith("$"):
            return scope[token[1:]], i + 1
        if token.startswith("."):
            return scope["."][token[1:]], i + 1
        return token, i + 1  # a function name

    functions = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "and": lambda *xs: all(xs),
        "or": lambda *xs: any(xs),
        "not": lambda x: not x,
        "len": len,
        "slice": lambda xs, i: xs[i:],
    }

    def call(i):
        head, i = term(i)
        args = []
        while i < len(tokens) and tokens[i] != ")":
            arg, i = term(i)
            args.append(arg)
        if isinstance(head, str) and head in functions:
            return functions[head](*args), i
        assert not args, f"cannot call {head}"
        return head, i

    value, end = call(0)
    assert end == len(tokens), expression
    return value


def go_run(nodes, scope, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(go_eval(node[1], scope)))
        elif node[0] == "set":
            scope[node[1]] = go_eval(node[2], scope)
        elif node[0] == "if":
            for condition, body in node[1]:
                if go_eval(condition, scope):
                    go_run(body, scope, out)
                    break
            else:
                go_run(node[2], scope, out)
        elif node[0] == "range":
            _, index, item, expression, body = node
            for i, value in enumerate(go_eval(expression, scope)):
                go_run(body, {**scope, index: i, item: value, ".": value}, out)


def render_go(template, messages, system=None):
    """What Ollama renders for a chat request: SYSTEM goes first when no system message is given."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    data = {
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
        "System": system or "",
    }
    nodes, _, _ = go_parse(go_lex(template))
    out = []
    go_run(nodes, {"$": data, ".": data}, out)
    return "".join(out)


def parse_modelfile(text):
    """FROM, TEMPLATE, SYSTEM and stop parameters, as Ollama's parser reads them."""
    found = {"stop": []}
    rest = text
    while rest.strip():
        keyword, _, rest = rest.lstrip().partition(" ")
        if rest.startswith('"""'):
            value, _, rest = rest[3:].partition('"""')
        else:
            value, _, rest = rest.partition("\n")
        if keyword == "PARAMETER":
            name, stop = value.split(None, 1)
            assert name == "stop"
            found["stop"].append(json.loads(stop))
        else:
            found[keyword] = value
    return found


# --- the tests -------------------------------------------------------------------------------


def test_renderer_runs_a_known_ollama_template():
    """The renderer itself, on the ChatML template Ollama ships for Qwen2.5 (abridged)."""
    template = (
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}\n'
        "{{- end }}"
    )
    messages = [{"role": "user", "content": "Hi"}]
    assert render_go(template, messages, "S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


CONVERSATIONS = [
    [{"role": "user", "content": "你是谁?"}],
    [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Xinghe.\nAsk me anything."},
        {"role": "user", "content": "Who made you? {{ .System }}"},
    ],
]


def modelfile_for(tmp_path, tokenizer, system):
    tokenizer = copy.deepcopy(tokenizer)
    set_default_system(tokenizer, system)
    path = write_modelfile(tmp_path, "model-q8_0.gguf", tokenizer, system)
    return tokenizer, parse_modelfile(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("system", [TINY_SYSTEM, None])
def test_template_renders_like_the_chat_template(tmp_path, smol_tokenizer, system):
    tokenizer, modelfile = modelfile_for(tmp_path, smol_tokenizer, system)
    assert modelfile["FROM"] == "./model-q8_0.gguf"
    if system is None:  # the template's own default system prompt, as HF inserts it
        assert modelfile["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
    else:
        assert modelfile["SYSTEM"] == system
    assert "<|im_end|>" in modelfile["stop"]
    for messages in CONVERSATIONS:
        for given in (None, "Answer in one line."):
            conversation = (
                messages if given is None else [{"role": "system", "content": given}, *messages]
            )
            hf = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
            assert render_go(modelfile["TEMPLATE"], conversation, modelfile["SYSTEM"]) == hf
            if given is None:
                assert (system or "SmolLM") in hf


LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def test_llama3_format_leaves_bos_to_the_runtime(tmp_path, smol_tokenizer):
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = LLAMA3_TEMPLATE
    tokenizer, modelfile = modelfile_for(tmp_path, tokenizer, TINY_SYSTEM)
    assert "<|eot_id|>" in modelfile["stop"]
    for messages in CONVERSATIONS:
        hf = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        go = render_go(modelfile["TEMPLATE"], messages, modelfile["SYSTEM"])
        # This tokenizer adds no BOS when encoding, so the template must keep it.
        assert go == hf and go.startswith("<|im_start|><|start_header_id|>system")


def test_a_template_that_wraps_turns_unevenly_is_refused(smol_tokenizer):
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.index0 == 1 %}[second]{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(SelftuneError, match="no Ollama TEMPLATE"):
        chat_frame(tokenizer, None)

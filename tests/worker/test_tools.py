"""Tool calls out of text and into prompts (lmfleet.worker.tools): every format parses what its own grammar allows,
the same way however the text is cut, and a resumed parse sends exactly what the client had not got."""

from __future__ import annotations

import json
import random

import pytest

from lmfleet.engine.grammar import Grammars
from lmfleet.protocol.worker import ToolCallChunk, ToolFunction
from lmfleet.worker import tools
from tests.fakes import ByteTokenizer

ADD = ToolFunction(
    name="add",
    parameters={
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
)
PING = ToolFunction(name="ping")
TEXTS = {
    "hermes": 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"c": "}\\""}}}\n</tool_call>\n'
    '<tool_call>\n{"arguments": {}, "name": "ping"}\n</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "ping", "parameters": {}}',
    "mistral": 'Sure [TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "ping", "arguments": "{}"}]',
}


def parse(stream: tools.CallStream, text: str, rng: random.Random | None = None) -> tuple[str, list[ToolCallChunk]]:
    content, pieces, i = "", [], 0
    while i < len(text):
        n = rng.randint(1, 6) if rng else len(text)
        c, p = stream.push(text[i : i + n])
        content, pieces, i = content + c, pieces + p, i + n
    c, p = stream.finish()
    return content + c, pieces + p


def calls_of(pieces: list[ToolCallChunk]) -> list[tuple[str | None, str]]:
    calls: dict[int, list] = {}
    for p in pieces:
        calls.setdefault(p.index, [p.name, ""])[1] += p.arguments
    return [tuple(c) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("fmt", sorted(tools.FORMATS))
def test_each_format_parses_calls_the_same_however_the_text_is_cut(fmt: str) -> None:
    content, pieces = parse(tools.CallStream(tools.FORMATS[fmt]), TEXTS[fmt])
    assert [name for name, _ in calls_of(pieces)] == ["add", "ping"]
    assert json.loads(calls_of(pieces)[0][1])["a"] == 1 and calls_of(pieces)[1][1] == "{}"
    assert "{" not in content and "tool" not in content.lower()
    assert [p.id is not None for p in pieces if p.name] == [True, True]
    for seed in range(40):
        again = parse(tools.CallStream(tools.FORMATS[fmt]), TEXTS[fmt], random.Random(seed))
        assert (again[0], calls_of(again[1])) == (content, calls_of(pieces))


@pytest.mark.parametrize("fmt", sorted(tools.FORMATS))
def test_without_parallel_calls_only_the_first_counts(fmt: str) -> None:
    _, pieces = parse(tools.CallStream(tools.FORMATS[fmt], single=True), TEXTS[fmt])
    assert [name for name, _ in calls_of(pieces)] == ["add"]


@pytest.mark.parametrize("fmt", sorted(tools.FORMATS))
def test_plain_answers_stay_content(fmt: str) -> None:
    for text in ("Paris is the capital of France.", "a < b and {x} < y", '{"answer": 42}'):
        content, pieces = parse(tools.CallStream(tools.FORMATS[fmt]), text)
        assert (content, pieces) == (text, [])


@pytest.mark.parametrize("fmt", sorted(tools.FORMATS))
def test_a_resumed_parse_sends_exactly_the_rest(fmt: str) -> None:
    """For every point where a worker may die: what it had sent, then what a fresh parse of the whole text sends
    when told what was delivered, is the whole answer once."""
    text = TEXTS[fmt]
    whole_content, whole = parse(tools.CallStream(tools.FORMATS[fmt]), text)
    for cut in range(len(text) + 1):
        first = tools.CallStream(tools.FORMATS[fmt])
        sent_content, sent = first.push(text[:cut])
        delivered: list[int] = []
        for p in sent:
            delivered.extend([0] * (p.index + 1 - len(delivered)))
            delivered[p.index] += len(p.arguments)
        resumed = tools.CallStream(tools.FORMATS[fmt], skip_content=len(sent_content), skip_calls=delivered)
        rest_content, rest = parse(resumed, text)
        assert sent_content + rest_content == whole_content
        assert calls_of(sent + rest) == calls_of(whole)
        assert len([p for p in sent + rest if p.id]) == 2, "each call announced once"


@pytest.mark.parametrize("fmt", sorted(tools.FORMATS))
def test_what_a_forced_grammar_allows_parses_as_the_call(fmt: str) -> None:
    f = tools.FORMATS[fmt]
    grammars = Grammars(ByteTokenizer())
    call = [{"function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
    text = f.written(call)
    one = grammars.constraint(grammars.lark(f.grammar([ADD, PING], parallel=False)))
    assert one.advance_all(list(text.encode())) and one.finished
    two = f.written(call + [{"function": {"name": "ping", "arguments": "{}"}}])
    several = grammars.constraint(grammars.lark(f.grammar([ADD, PING], parallel=True)))
    assert several.advance_all(list(two.encode()))
    assert not grammars.constraint(grammars.lark(f.grammar([ADD], parallel=False))).advance_all(list(two.encode()))
    assert calls_of(parse(tools.CallStream(f), two)[1]) == [("add", '{"a": 1, "b": 2}'), ("ping", "{}")]


def test_the_format_comes_from_the_chat_template_or_the_flag() -> None:
    assert tools.detect(None).name == "hermes"
    qwen = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>{% endif %}"
    assert tools.takes_tools(qwen) and tools.detect(qwen).name == "hermes"
    assert tools.detect("{% if tools %}[AVAILABLE_TOOLS][TOOL_CALLS]{% endif %}").name == "mistral"
    assert tools.detect('{% if tools %}<|python_tag|>"parameters"{% endif %}').name == "llama3_json"
    assert tools.detect(qwen, "mistral").name == "mistral"
    assert not tools.takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    from lmfleet import cli

    for name in [tools.AUTO, *tools.FORMATS]:  # the flag offers every format
        args = cli.build_parser().parse_args(["worker", "--model-path", "m.gguf", "--tool-parser", name])
        assert args.tool_parser == name


def test_the_generic_prompt_writes_tools_calls_and_results_in_hermes_form() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    out, specs = tools.prepare(messages, [ADD], native=False)
    assert specs is None and [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"name": "add"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\n3\n</tool_response>"
    native, specs = tools.prepare(messages, [ADD], native=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert specs == [{"type": "function", "function": ADD.model_dump(exclude_none=True)}]


QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_takes_tools_gets_them_and_earlier_calls_as_objects(tiny_models) -> None:
    pytest.importorskip("transformers")
    from lmfleet.engine.transformers.tokenizer import HFTokenizer

    tokenizer = HFTokenizer.load(str(tiny_models["alpha"]))
    tokenizer._tok.chat_template = QWEN_LIKE
    assert tools.takes_tools(tokenizer.chat_template) and tools.detect(tokenizer.chat_template).name == "hermes"
    messages = [
        {"role": "user", "content": "1+2?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "3"},
    ]
    prepared, specs = tools.prepare(messages, [ADD], native=True)
    text = tokenizer.decode(tokenizer.render_chat(prepared, tools=specs), skip_special_tokens=False)
    assert '"name": "add"' in text and '<tool_call>{"a": 1, "b": 2}</tool_call>' in text
    assert "<|im_start|>tool\n3" in text


WEATHER = ToolFunction(
    name="get_weather",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
BARE_CALLS = [
    CALL,  # what Qwen2.5-Coder-0.5B answers with one tool offered
    '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris",\n    "unit": "celsius"\n  }\n}\n```',
    f"\n  {CALL}\n",
    f"```\n{CALL}",  # a fence the model did not get to close
]
NOT_CALLS = [
    '{"name": "Cat", "arguments": {"age": 5}}',  # not an offered function
    f"{CALL} is how I would call it.",  # more than the call
    f"```json\n{CALL}\n```\nDone.",
    f"Here: {CALL}",
    '{"name": "get_weather", "arguments": 5}',
    '{"name": "get_weather", "arguments": {"city": "Paris"}, "note": 1}',
    '{"name": "get_weather", "arguments": {"city": "Par',  # cut by max_tokens
    "```python\nprint(1)\n```",
    '{"answer": 42}',
]


@pytest.mark.parametrize("fmt", ["hermes", "mistral"])
def test_a_reply_that_is_only_a_bare_call_to_an_offered_function_is_that_call(fmt: str) -> None:
    """Without the format's markers, alone or in a Markdown fence: the call (its arguments in one layout), the same
    however the text is cut, nothing of it as content; only the first with `single`."""
    f = tools.FORMATS[fmt]
    for text in BARE_CALLS:
        content, pieces = parse(tools.CallStream(f, names=["get_time", "get_weather"]), text)
        assert (content, calls_of(pieces)) == ("", [("get_weather", '{"city": "Paris", "unit": "celsius"}')]), text
        assert pieces[0].id is not None
        for seed in range(10):
            again = parse(tools.CallStream(f, names=["get_weather"], single=True), text, random.Random(seed))
            assert (again[0], calls_of(again[1])) == (content, calls_of(pieces))


@pytest.mark.parametrize("text", NOT_CALLS)
def test_a_reply_that_only_looks_like_a_bare_call_is_content(text: str) -> None:
    for seed in range(10):
        content, pieces = parse(
            tools.CallStream(tools.FORMATS["hermes"], names=["get_weather"]), text, random.Random(seed)
        )
        assert (content, pieces) == (text, [])
    assert parse(tools.CallStream(tools.FORMATS["hermes"]), CALL) == (CALL, [])  # no function offered: text


def test_content_that_stops_looking_like_a_bare_call_is_sent_at_once() -> None:
    stream = tools.CallStream(tools.FORMATS["hermes"], names=["get_weather"])
    assert stream.push('```json\n{"name": "get_we') == ("", [])  # may be a call: held
    assert stream.push('ather", "arguments": {}}') == ("", [])
    assert stream.push("\n```\nThat") == ('```json\n{"name": "get_weather", "arguments": {}}\n```\nThat', [])
    assert stream.push(" is all.") == (" is all.", [])
    cat = tools.CallStream(tools.FORMATS["hermes"], names=["get_weather"])
    assert cat.push('{"name": "Cat", "age"') == ('{"name": "Cat", "age"', [])


def test_a_resumed_bare_call_is_announced_once() -> None:
    """A bare call is held until the reply ends, so a worker that dies before has sent nothing of it."""
    for cut in range(len(CALL) + 1):
        first = tools.CallStream(tools.FORMATS["hermes"], names=["get_weather"])
        assert first.push(CALL[:cut]) == ("", [])
        content, pieces = parse(tools.CallStream(tools.FORMATS["hermes"], names=["get_weather"]), CALL)
        assert content == "" and len([p for p in pieces if p.id]) == 1


@pytest.mark.parametrize("fmt", sorted(tools.FORMATS))
def test_forced_arguments_take_only_the_declared_properties(fmt: str) -> None:
    """Strict mode: a schema that does not say what other properties may be gets none (the model used to add one
    and run on until max_tokens); a schema that allows them keeps them, nested objects too."""
    f = tools.FORMATS[fmt]
    grammars = Grammars(ByteTokenizer())

    def takes(function: ToolFunction, arguments: dict) -> bool:
        text = f.written([{"function": {"name": function.name, "arguments": json.dumps(arguments)}}])
        return grammars.constraint(grammars.lark(f.grammar([function], parallel=False))).advance_all(
            list(text.encode())
        )

    assert takes(WEATHER, {"city": "Paris"}) and not takes(WEATHER, {"city": "Paris", "unit": "c"})
    nested = ToolFunction(
        name="book",
        parameters={
            "type": "object",
            "properties": {"who": {"type": "object", "properties": {"name": {"type": "string"}}}},
            "additionalProperties": True,
        },
    )
    assert takes(nested, {"who": {"name": "Ann"}, "note": "x"})  # the schema allows more at the top
    assert not takes(nested, {"who": {"name": "Ann", "age": 3}})  # its nested object does not say: closed

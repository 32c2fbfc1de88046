"""Tool calling for one model: tools into the prompt, tool calls out of the text, and the grammar of a forced call.

Owns, per tool-call format (`FORMATS`, chosen with the worker's `--tool-parser`; `auto` reads the chat template):
  * rendering: a chat template that takes `tools` gets them (and earlier assistant `tool_calls` with their arguments
    as objects, as templates expect); any other template gets the generic prompt below, Hermes-style: the tools in
    a system message, earlier calls as `<tool_call>` blocks, tool results as `<tool_response>` user turns;
  * parsing (`CallStream`): generated text in, content and OpenAI-style tool-call pieces out (the first piece of a
    call has its id and name, the rest add fragments of its arguments' JSON), as the text arrives. What comes out
    depends only on the text, never on how it was cut into pieces, so a resumed generation parses the replayed text
    again and skips what the client already has (`protocol.worker`). A reply that is nothing but one call without
    the format's markers (bare JSON, or in a ```json fence, as small models write when they are offered tools) is
    that call if it names an offered function;
  * the grammar of a forced call (`ToolFormat.grammar`): `tool_choice` "required" or a named function, in the
    format's own syntax, the arguments following each function's JSON schema as strict mode reads it (no property
    the schema does not declare, unless it says so; lmfleet.engine.grammar closes and compiles it).

Formats:
    hermes       content, then `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks (Qwen, Hermes)
    llama3_json  the whole output is `{"name": ..., "parameters": {...}}` (several joined by `; `) (Llama 3.x)
    mistral      content, then `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`

Does not own: detokenizing and stop strings (worker/textgen.py), compiling grammars (lmfleet.engine.grammar),
the OpenAI objects (lmfleet.api.render).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta

from lmfleet.engine.grammar import closed, with_layout
from lmfleet.protocol.worker import ToolCallChunk, ToolFunction

AUTO = "auto"

GENERIC_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML \
tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tool calls: `start` opens the calls (empty: the output starts with the first
    call's JSON), calls are JSON objects with the function's name and its arguments under `args_key`, written
    `open` + calls joined by `sep` + `close`, each as `call_open` + JSON + `call_close`."""

    name: str
    start: str
    args_key: str = "arguments"
    open: str = ""
    close: str = ""
    sep: str = "\n"
    call_open: str = ""
    call_close: str = ""

    def grammar(self, functions: Sequence[ToolFunction], *, parallel: bool) -> str:
        """A Lark grammar for one call (or, with `parallel`, one or more) to one of `functions`."""
        rules = [f"start: {_lit(self.open)} call {f'({_lit(self.sep)} call)*' if parallel else ''} {_lit(self.close)}"]
        rules.append(
            f"call: {_lit(self.call_open)} ({' | '.join(f'fn_{i}' for i in range(len(functions)))}) "
            f"{_lit(self.call_close)}"
        )
        for i, f in enumerate(functions):
            schema = {
                "type": "object",
                "properties": {"name": {"const": f.name}, self.args_key: closed(f.parameters or _NO_PARAMETERS)},
                "required": ["name", self.args_key],
                "additionalProperties": False,
            }
            rules.append(f"fn_{i}: %json {json.dumps(with_layout(schema))}")
        return "\n".join(rules)

    def written(self, calls: Sequence[dict[str, Any]]) -> str:
        """Earlier calls (OpenAI `tool_calls`) as this format writes them (the generic prompt's history)."""
        texts = [
            self.call_open
            + json.dumps({"name": c["function"]["name"], self.args_key: _arguments(c["function"]["arguments"])})
            + self.call_close
            for c in calls
        ]
        return self.open + self.sep.join(texts) + self.close


_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}

FORMATS: dict[str, ToolFormat] = {
    f.name: f
    for f in (
        ToolFormat("hermes", start="<tool_call>", call_open="<tool_call>\n", call_close="\n</tool_call>"),
        ToolFormat("llama3_json", start="", args_key="parameters", sep="; "),
        ToolFormat("mistral", start="[TOOL_CALLS]", open="[TOOL_CALLS][", close="]", sep=", "),
    )
}


def _lit(text: str) -> str:
    return json.dumps(text) if text else ""


def _arguments(arguments: Any) -> Any:
    """An earlier call's arguments as an object (OpenAI sends a JSON string; templates expect the object)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def takes_tools(template: str | None) -> bool:
    """Whether a chat template reads a `tools` variable."""
    if not template:
        return False
    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateError:
        return False
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


def detect(template: str | None, chosen: str = AUTO) -> ToolFormat:
    """The format for a model: the one chosen, else the one its chat template writes (Hermes by default, which is
    also the generic prompt's)."""
    if chosen != AUTO:
        return FORMATS[chosen]
    if takes_tools(template):
        for marker, name in (
            ("[TOOL_CALLS]", "mistral"),
            ("<|python_tag|>", "llama3_json"),
            ('"parameters"', "llama3_json"),
        ):
            if marker in (template or ""):
                return FORMATS[name]
    return FORMATS["hermes"]


def prepare(
    messages: list[dict[str, Any]], tools: Sequence[ToolFunction], *, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and the `tools` argument) for the chat template. `native`: the template takes tools itself; else
    the generic Hermes prompt is written into the messages."""
    specs = [{"type": "function", "function": t.model_dump(exclude_none=True)} for t in tools]
    if native:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [
                    {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                    for c in m["tool_calls"]
                ]
                m = {**m, "tool_calls": calls}
            out.append(m)
        return out, specs or None
    hermes = FORMATS["hermes"]
    out = []
    for m in messages:
        if m.get("tool_calls"):
            text = "\n".join(p for p in (m.get("content") or "", hermes.written(m["tool_calls"])) if p)
            m = {"role": "assistant", "content": text}
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if specs:
        prompt = GENERIC_TOOL_PROMPT.format(tools="\n".join(json.dumps(s) for s in specs))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


class _CallScanner:
    """One call object, `{"name": ..., "<args_key>": ...}`, a character at a time: its name once its string has
    closed, the raw text of its arguments as it comes, and whether the object is complete or broken."""

    def __init__(self, args_key: str) -> None:
        self._args_key = args_key
        self.depth = 0
        self._in_str = self._esc = False
        self._state = "start"  # start, key, colon, value, scalar, after
        self._field = ""  # what the current depth-1 value is: "name", "args" or "other"
        self._buf = ""  # the key or name string being read
        self.name: str | None = None
        self.args = ""  # raw JSON text of the arguments so far
        self.args_done = False
        self.done = self.broken = False

    def feed(self, c: str) -> None:
        if self.done or self.broken:
            return
        capturing = self._field == "args" and self._state in ("value", "scalar") and self.depth >= 1
        if self._in_str:
            if capturing:
                self.args += c
            elif self.depth == 1:
                self._buf += c
            if self._esc:
                self._esc = False
            elif c == "\\":
                self._esc = True
            elif c == '"':
                self._in_str = False
                if self.depth == 1:
                    self._string_closed()
            return
        if self.depth >= 2:
            if capturing:
                self.args += c
            if c == '"':
                self._in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._value_closed()
            return
        self._structure(c)

    def _structure(self, c: str) -> None:
        """A character outside strings, in the call object itself (or before it)."""
        state = self._state
        if state == "scalar":
            if c not in ",}" and not c.isspace():
                self.args += c if self._field == "args" else ""
                return
            self._value_closed()
            state = self._state
        if c.isspace():
            return
        if state == "start":
            if c != "{":
                self.broken = True
            self.depth, self._state = 1, "key"
        elif state in ("key", "after"):
            if c == '"' and state == "key":
                self._in_str, self._buf = True, '"'
            elif c == "," and state == "after":
                self._state = "key"
            elif c == "}":
                self.depth, self.done = 0, True
            else:
                self.broken = True
        elif state == "colon":
            self._state, self.broken = "value", c != ":"
        elif state == "value":
            if self._field == "args":
                self.args += c
            elif self._field == "name":
                self._buf = c
            if c == '"':
                self._in_str = True
            elif c in "{[":
                self.depth += 1
            else:
                self._state = "scalar"

    def _string_closed(self) -> None:
        if self._state == "key":
            key = _loads(self._buf)
            self._field = "name" if key == "name" else "args" if key == self._args_key else "other"
            self._state = "colon"
        elif self._state == "value":
            if self._field == "name":
                name = _loads(self._buf)
                self.name = name if isinstance(name, str) else None
            self._value_closed()

    def _value_closed(self) -> None:
        if self._field == "args":
            self.args_done = True
        self._state, self._field = "after", ""


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


# A reply that is one bare call: the object alone, or in a Markdown code fence (```json ... ```), space around it.
_OPENING = re.compile(r"\s*(?:```(?:json)?\s*)?")  # what may come before the object's "{"
_OPENING_SO_FAR = re.compile(r"\s*(?:`{1,2}|```(?:\s*|j|js|jso|json\s*))?")  # ... or the start of that
_CLOSING_FENCED = re.compile(r"\s*(?:```\s*)?")  # after the object (an unclosed fence is forgiven)
_CLOSING_FENCED_SO_FAR = re.compile(r"\s*(?:`{1,3}\s*)?")
_CLOSING = re.compile(r"\s*")


class _BareCall:
    """Whether the whole reply, as far as it has come, may still be one call written without the format's markers:
    `{"name": <an offered function>, "<args_key>": {...}}`, alone or in a Markdown code fence (small models answer
    so). Fed a character at a time; `viable` turns false for good at the first character that rules it out."""

    def __init__(self, args_key: str, names: Sequence[str]) -> None:
        self._args_key = args_key
        self._names = set(names)
        self.text = ""  # the reply so far
        self._before = ""  # the text before the object
        self._object = ""  # the object's text
        self._after = ""  # the text after it
        self._scanner: _CallScanner | None = None
        self.viable = True

    def feed(self, c: str) -> None:
        self.text += c
        scanner = self._scanner
        if scanner is None:
            if c == "{" and _OPENING.fullmatch(self._before):
                scanner = self._scanner = _CallScanner(self._args_key)
            else:
                self._before += c
                self.viable = _OPENING_SO_FAR.fullmatch(self._before) is not None
                return
        if not scanner.done:
            self._object += c
            scanner.feed(c)
            unnamed = scanner.done and scanner.name is None
            self.viable = not (scanner.broken or unnamed or scanner.name not in (None, *self._names))
            return
        self._after += c
        fenced = "`" in self._before
        self.viable = (_CLOSING_FENCED_SO_FAR if fenced else _CLOSING).fullmatch(self._after) is not None

    def call(self) -> tuple[str, str] | None:
        """At the end of the reply: (name, arguments as JSON) if the whole reply is the call, else None."""
        if not (self.viable and self._scanner is not None and self._scanner.done):
            return None
        if "`" in self._before and _CLOSING_FENCED.fullmatch(self._after) is None:
            return None
        value = _loads(self._object)
        if not isinstance(value, dict) or set(value) - {"name", self._args_key} or value.get("name") not in self._names:
            return None
        arguments = value.get(self._args_key, {})
        if not isinstance(arguments, dict):
            return None
        return value["name"], json.dumps(arguments, ensure_ascii=False)


class CallStream:
    """Generated text → (content, tool-call pieces), for one choice (module docstring). `skip_content` characters of
    content and, for each call already announced to the client, `skip_calls[i]` characters of its arguments were
    delivered by an earlier worker: they are parsed again but not sent. With `single` only the first call counts.

    `names`, the functions offered: a format with markers also takes a reply that is nothing but one call written
    without them (`{"name": ..., "arguments": {...}}`, or that in a ```json fence) as that call, if it names one of
    them. Such a reply is held back until it ends (a reply that only starts like one is content, sent once it
    differs), so its call comes whole with the last piece."""

    def __init__(
        self,
        fmt: ToolFormat,
        *,
        names: Sequence[str] = (),
        single: bool = False,
        skip_content: int = 0,
        skip_calls: Sequence[int] = (),
    ) -> None:
        self._fmt = fmt
        self._bare = _BareCall(fmt.args_key, names) if fmt.start and names else None
        self._single = single  # parallel_tool_calls false: calls after the first are dropped
        self._mode = "content" if fmt.start else "first"  # content, first (llama3: before the first char), calls
        self._pending = ""  # content that may be the start of the format's marker (or, for llama3, the whole call)
        self._scanner: _CallScanner | None = None
        self._sent_args = 0  # characters of the current call's arguments parsed (sent or skipped)
        self.calls = 0  # calls announced (by this worker or an earlier one)
        self._skip_content = skip_content
        self._skip_calls = list(skip_calls)
        self._content: list[str] = []
        self._pieces: list[ToolCallChunk] = []

    def push(self, text: str) -> tuple[str, list[ToolCallChunk]]:
        for c in text:
            bare = self._bare
            if bare is None:
                self._char(c)
                continue
            bare.feed(c)
            if not bare.viable:  # not a bare call: parse what was held as any reply
                self._bare = None
                for held in bare.text:
                    self._char(held)
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallChunk]]:
        """The end of the text: held content is released; a call never named is dropped."""
        bare, self._bare = self._bare, None
        if bare is not None:
            call = bare.call()
            if call is not None:
                self._announce(call[0])
                self._call_piece(arguments=call[1])
                return self._take()
            for held in bare.text:
                self._char(held)
        if self._mode in ("content", "first") or (self._mode == "calls" and self.calls == 0 and not self._fmt.start):
            self._emit_content(self._pending)
            self._pending = ""
        scanner = self._scanner
        if scanner is not None and scanner.name is not None and scanner.args_done is False and not scanner.args:
            self._call_piece(arguments="{}")
        return self._take()

    # -- the state machine --------------------------------------------------------------------------------------

    def _char(self, c: str) -> None:
        if self._mode == "content":
            self._content_char(c)
        elif self._mode == "first":  # llama3: the output is calls if its first character (after space) is "{"
            self._pending += c
            if c == "{":
                self._mode = "calls"
                self._call_char(c)
            elif not c.isspace() and not "<|python_tag|>".startswith(self._pending.lstrip()):
                self._mode = "content"
                self._emit_content(self._pending)
                self._pending = ""
        else:
            if not self._fmt.start and self.calls == 0:
                self._pending += c
            self._call_char(c)

    def _content_char(self, c: str) -> None:
        self._pending += c
        start = self._fmt.start
        if not start:
            self._emit_content(self._pending)
            self._pending = ""
        elif self._pending.endswith(start):
            self._emit_content(self._pending[: -len(start)])
            self._pending, self._mode = "", "calls"
        else:
            keep = next(
                (
                    n
                    for n in range(min(len(start) - 1, len(self._pending)), 0, -1)
                    if start.startswith(self._pending[-n:])
                ),
                0,
            )
            self._emit_content(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]

    def _call_char(self, c: str) -> None:
        scanner = self._scanner
        if scanner is None:
            if c != "{" or (self._single and self.calls):
                return  # between calls: separators, closing tags
            scanner = self._scanner = _CallScanner(self._fmt.args_key)
            self._sent_args = 0
        named = scanner.name is not None
        scanner.feed(c)
        if scanner.name is not None and not named:
            self._announce(scanner.name)
        if scanner.name is not None and len(scanner.args) > self._sent_args and not scanner.args.startswith('"'):
            self._call_piece(arguments=scanner.args[self._sent_args :])
            self._sent_args = len(scanner.args)
        if scanner.done or scanner.broken:
            self._call_done(scanner)

    def _call_done(self, scanner: _CallScanner) -> None:
        self._scanner = None
        if scanner.name is None:
            if not self._fmt.start and self.calls == 0:  # llama3: JSON content, not a call
                self._mode = "content"
                self._emit_content(self._pending)
                self._pending = ""
            return
        if scanner.args.startswith('"'):  # arguments sent as a JSON string holding JSON
            value = _loads(scanner.args)
            self._call_piece(arguments=value if isinstance(value, str) else scanner.args)
        elif not scanner.args:
            self._call_piece(arguments="{}")
        self._pending = ""

    def _announce(self, name: str) -> None:
        index = self.calls
        self.calls += 1
        self._pending = ""
        if index < len(self._skip_calls):
            return  # announced by the earlier worker
        self._pieces.append(ToolCallChunk(index=index, id=f"call_{uuid.uuid4().hex[:24]}", name=name))

    def _call_piece(self, *, arguments: str) -> None:
        index = self.calls - 1
        if index < len(self._skip_calls):
            cut = min(self._skip_calls[index], len(arguments))
            self._skip_calls[index] -= cut
            arguments = arguments[cut:]
        if not arguments:
            return
        if self._pieces and self._pieces[-1].index == index:
            self._pieces[-1].arguments += arguments
        else:
            self._pieces.append(ToolCallChunk(index=index, arguments=arguments))

    def _emit_content(self, text: str) -> None:
        if self._skip_content and text:
            cut = min(self._skip_content, len(text))
            self._skip_content -= cut
            text = text[cut:]
        if text:
            self._content.append(text)

    def _take(self) -> tuple[str, list[ToolCallChunk]]:
        content, pieces = "".join(self._content), self._pieces
        self._content, self._pieces = [], []
        return content, pieces

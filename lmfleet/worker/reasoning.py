"""Reasoning apart from the answer, for models that think before they answer (`<think>…</think>`).

Owns, per reasoning format (`FORMATS`, chosen with the worker's `--reasoning-parser`; `auto` reads the chat
template, `none` turns it off):
  * where a chat answer's output starts (`ReasoningFormat.after`): inside the reasoning or not, from the end of
    the rendered prompt (a template that opens `<think>` in the generation prompt, or writes an empty
    `<think></think>` block for `enable_thinking: false`);
  * the split (`ReasoningStream`): generated text in (after stop strings), reasoning and content out, as the text
    arrives; the tags are never in either. What comes out depends only on the text, never on how it was cut into
    pieces (a tag split across tokens is held back until decided, as stop strings are), so a resumed generation
    splits the replayed text again and skips what the client already has (`protocol.worker`);
  * the Lark lead of a grammar that constrains only what follows the reasoning (`Thinking.grammar_lead`): free
    text up to the closing tag, then the constrained part (lmfleet.engine.grammar `Grammars.then`).

Formats:
    deepseek_r1  the output is reasoning until `</think>`, whether or not the template opened `<think>`
                 (DeepSeek-R1 and its distills; QwQ): a `<think>` the model writes first is dropped; a prompt that
                 ends in a closed `<think></think>` block starts in the answer
    qwen3        the output is reasoning when the prompt ends inside an open `<think>` or the model writes
                 `<think>` first (Qwen3); otherwise it is all answer (`enable_thinking: false`: the template
                 writes an empty `<think></think>` and the model writes none)

Either way a missing `</think>` (max_tokens cut the reasoning) leaves everything reasoning, and a `<think>` inside
the answer is answer text. The tags are matched as text: `<think>` and `</think>` are plain added tokens in these
models' vocabularies, kept by the detokenizer.

Does not own: detokenizing and stop strings (worker/textgen.py), tool calls, parsed from the answer only
(worker/tools.py), compiling grammars (lmfleet.engine.grammar), how each endpoint spells reasoning (lmfleet.api).
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
NONE = "none"

_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")


@dataclass(frozen=True)
class ReasoningFormat:
    """How one model family marks its reasoning: between `start` and `end`; `always_inside`: the output starts
    inside the reasoning unless the prompt says otherwise (the template opened or closed a block at its end)."""

    name: str
    always_inside: bool
    start: str = "<think>"
    end: str = "</think>"

    def after(self, prompt_tail: str) -> Thinking:
        """Where the output that follows a prompt ending in `prompt_tail` (its last few tokens' text) starts."""
        opened, closed = prompt_tail.rfind(self.start), prompt_tail.rfind(self.end)
        if opened > closed:
            return Thinking(self, inside=True)
        if closed >= 0:
            return Thinking(self, inside=False)
        return Thinking(self, inside=self.always_inside)


FORMATS: dict[str, ReasoningFormat] = {
    f.name: f for f in (ReasoningFormat("deepseek_r1", always_inside=True), ReasoningFormat("qwen3", False))
}


def detect(template: str | None, chosen: str = AUTO) -> ReasoningFormat | None:
    """The format for a model: the one chosen (None for `none`), else the one its chat template says: a template
    without `<think>` / `</think>` has no reasoning to split; one that reads `enable_thinking` (Qwen3) or writes
    no DeepSeek markers gets `qwen3` (the prompt decides where the output starts), DeepSeek's gets `deepseek_r1`."""
    if chosen != AUTO:
        return None if chosen == NONE else FORMATS[chosen]
    text = template or ""
    if "<think>" not in text and "</think>" not in text:
        return None
    if "enable_thinking" not in text and "<｜Assistant｜>" in text:
        return FORMATS["deepseek_r1"]
    return FORMATS["qwen3"]


@dataclass(frozen=True)
class Thinking:
    """One chat answer's reasoning: its format, and whether the output starts inside the reasoning."""

    format: ReasoningFormat
    inside: bool

    def stream(self, *, skip_reasoning: int = 0, skip_content: int = 0) -> ReasoningStream:
        return ReasoningStream(self, skip_reasoning=skip_reasoning, skip_content=skip_content)

    def grammar_lead(self) -> str:
        """Lark rules for the reasoning before a constrained answer, reached as `@then` (lmfleet.engine.grammar
        `Grammars.then`): any text up to the first closing tag, then at most four whitespace characters. Outside
        the reasoning the model may open it first (with the tag) or answer at once."""
        fmt = self.format
        rules = [
            f"think[lazy]: /(?s:.*){_regex(fmt.end)}/",
            "gap: /[ \\t\\r\\n]{0,4}/",
        ]
        lead = "think gap" if self.inside else f'("{_lark_string(fmt.start)}" think gap)?'
        return "\n".join([f"start: {lead} @then", *rules])


def _regex(text: str) -> str:
    """`text` as a literal inside a Lark `/regex/`."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _lark_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


_OPENING, _REASONING, _ANSWER = "opening", "reasoning", "answer"


class ReasoningStream:
    """Generated text → (reasoning, content), for one choice (module docstring). `skip_reasoning` and `skip_content`
    characters of each were delivered by an earlier worker: the replayed text is split again but they are not sent.

    The output opens (`opening`) with an optional tag, leading whitespace held until decided; then it is the
    reasoning (text that may be the start of the closing tag held back) and, after the closing tag, the answer."""

    def __init__(self, thinking: Thinking, *, skip_reasoning: int = 0, skip_content: int = 0) -> None:
        self._format = thinking.format
        self._inside = thinking.inside
        self._state = _OPENING
        self.reasoned = False  # the output went into the reasoning
        self._pending = ""
        self._skip = {_REASONING: skip_reasoning, _ANSWER: skip_content}
        self._out = {_REASONING: "", _ANSWER: ""}

    @property
    def answering(self) -> bool:
        """The reasoning is over (or never began): whatever comes next is content."""
        return self._state == _ANSWER

    def push(self, text: str) -> tuple[str, str]:
        """The reasoning and the content in `text`, as far as decided."""
        self._pending += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> tuple[str, str]:
        """The end of the text: what was held back (a partial tag is text; an unclosed reasoning stays reasoning)."""
        self._advance(final=True)
        return self._take()

    def _advance(self, *, final: bool) -> None:
        fmt = self._format
        while self._pending:
            if self._state == _OPENING:
                head = self._pending.lstrip()
                if head.startswith(fmt.start):
                    self._pending = head[len(fmt.start) :]
                    self._enter(_REASONING)
                elif fmt.start.startswith(head) and not final:
                    return  # whitespace, or the start of the opening tag: undecided
                else:
                    self._enter(_REASONING if self._inside else _ANSWER)
            elif self._state == _REASONING:
                end = self._pending.find(fmt.end)
                if end >= 0:
                    self._emit(_REASONING, self._pending[:end])
                    self._pending = self._pending[end + len(fmt.end) :]
                    self._enter(_ANSWER)
                    continue
                keep = 0 if final else _partial_tail(self._pending, fmt.end)
                self._emit(_REASONING, self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                return
            else:
                self._emit(_ANSWER, self._pending)
                self._pending = ""
        if final and self._state == _OPENING and self._inside:
            self._enter(_REASONING)

    def _enter(self, state: str) -> None:
        self._state = state
        self.reasoned = self.reasoned or state == _REASONING

    def _emit(self, kind: str, text: str) -> None:
        skip = min(self._skip[kind], len(text))
        self._skip[kind] -= skip
        self._out[kind] += text[skip:]

    def _take(self) -> tuple[str, str]:
        reasoning, content = self._out[_REASONING], self._out[_ANSWER]
        self._out = {_REASONING: "", _ANSWER: ""}
        return reasoning, content


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is the start of `tag` (and not all of it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0

"""The reasoning split (lmfleet.worker.reasoning) on its own, then through the worker's pipeline with the byte
tokenizer (one token per byte, so every tag is split across tokens): reasoning apart from the answer whatever the
pieces, a missing closing tag when max_tokens cuts the reasoning, the prompt deciding where the output starts,
resumed text skipped, and the grammar lead that lets a grammar constrain only what follows the reasoning."""

from __future__ import annotations

import pytest

from lmfleet.protocol.worker import GenerateChunk
from lmfleet.worker import reasoning
from lmfleet.worker.reasoning import FORMATS, ReasoningStream
from tests.fakes import THINKING_TEMPLATES, ByteTokenizer, ScriptedEngine, ThinkingTokenizer

from .test_pipeline import serving, text_of

QWEN3, R1 = FORMATS["qwen3"], FORMATS["deepseek_r1"]
THOUGHT = "\nIs 1 < 2? {yes} </thinking aloud> ünï 🙂\n"
ANSWER = "\n\nThe answer is yes ✓."
WRITTEN = f"<think>{THOUGHT}</think>{ANSWER}"  # what a Qwen3-style model writes


def split(stream: ReasoningStream, pieces: list[str]) -> tuple[str, str]:
    out = [stream.push(p) for p in pieces] + [stream.finish()]
    return "".join(r for r, _ in out), "".join(c for _, c in out)


def cuts(text: str) -> list[list[str]]:
    """`text` whole, a character at a time, and cut in two at every place."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


@pytest.mark.parametrize("pieces", cuts(WRITTEN))
def test_the_split_depends_on_the_text_not_on_its_pieces(pieces: list[str]) -> None:
    assert split(QWEN3.after("assistant:").stream(), pieces) == (THOUGHT, ANSWER)


@pytest.mark.parametrize("pieces", cuts(f"{THOUGHT}</think>{ANSWER}"))
def test_output_that_starts_inside_the_reasoning_has_no_opening_tag(pieces: list[str]) -> None:
    """DeepSeek-R1: the template opened `<think>` in the generation prompt; the output starts inside."""
    assert split(R1.after("assistant:<think>\n").stream(), pieces) == (THOUGHT, ANSWER)
    assert split(QWEN3.after("assistant:<think>\n").stream(), pieces) == (THOUGHT, ANSWER)


def test_deepseek_r1_reasons_from_the_start_and_drops_a_tag_the_model_writes() -> None:
    assert split(R1.after("assistant:").stream(), [f"{THOUGHT}</think>{ANSWER}"]) == (THOUGHT, ANSWER)
    assert split(R1.after("assistant:").stream(), list(f"  <think>{THOUGHT}</think>{ANSWER}")) == (THOUGHT, ANSWER)


@pytest.mark.parametrize("fmt", [QWEN3, R1])
def test_a_closed_block_at_the_end_of_the_prompt_means_the_answer_alone(fmt: reasoning.ReasoningFormat) -> None:
    """`enable_thinking: false`: the template writes an empty block; the output is all answer."""
    thinking = fmt.after("assistant:<think>\n\n</think>\n\n")
    assert not thinking.inside
    assert split(thinking.stream(), list("The answer <think> is text.")) == ("", "The answer <think> is text.")


def test_qwen3_without_the_tag_is_all_answer_and_keeps_its_leading_whitespace() -> None:
    assert split(QWEN3.after("assistant:").stream(), list("\n <thin k>")) == ("", "\n <thin k>")
    assert split(QWEN3.after("assistant:").stream(), ["  "]) == ("", "  ")


@pytest.mark.parametrize("cut", [7, 9, len(WRITTEN) - len(ANSWER) - 3, len(WRITTEN) - len(ANSWER) - 1])
def test_a_missing_closing_tag_leaves_everything_reasoning(cut: int) -> None:
    """max_tokens cut the reasoning, even half-way through `</think>`: what was written is reasoning."""
    text = WRITTEN[:cut]
    reasoning_text, content = split(QWEN3.after("").stream(), list(text))
    assert content == "" and reasoning_text == text.removeprefix("<think>")


def test_nothing_is_sent_before_a_possible_tag_is_decided() -> None:
    stream = QWEN3.after("").stream()
    assert stream.push("<thi") == ("", "")
    assert stream.push("nk>Hmm </th") == ("Hmm ", "")
    assert stream.push("ink>") == ("", "") and stream.answering
    assert stream.push(" ok") == ("", " ok")


@pytest.mark.parametrize("delivered", [(0, 0), (3, 0), (len(THOUGHT), 0), (len(THOUGHT), 4)])
def test_a_resumed_split_skips_what_was_delivered(delivered: tuple[int, int]) -> None:
    r, c = delivered
    stream = QWEN3.after("").stream(skip_reasoning=r, skip_content=c)
    assert split(stream, list(WRITTEN)) == (THOUGHT[r:], ANSWER[c:])


def test_which_templates_think() -> None:
    assert reasoning.detect(None) is None and reasoning.detect("{{ messages }}") is None
    assert reasoning.detect(THINKING_TEMPLATES["qwen3"]) is QWEN3
    assert reasoning.detect(THINKING_TEMPLATES["deepseek_r1"]) is R1
    assert reasoning.detect("{{ content.split('</think>')[-1] }}") is QWEN3  # the prompt decides where output starts
    assert reasoning.detect(THINKING_TEMPLATES["qwen3"], "none") is None
    assert reasoning.detect(None, "deepseek_r1") is R1


def test_the_flag() -> None:
    from lmfleet import cli

    for name in ("auto", "none", *FORMATS):
        args = cli.build_parser().parse_args(["worker", "--model-path", "m.gguf", "--reasoning-parser", name])
        assert args.reasoning_parser == name


@pytest.mark.parametrize("inside", [True, False])
def test_a_grammar_after_the_reasoning(inside: bool) -> None:
    """Free text (even braces and a tag-like `</thinking`) up to `</think>`, a little whitespace, then the JSON."""
    pytest.importorskip("llguidance")
    from lmfleet.engine.grammar import Grammars

    grammars = Grammars(ByteTokenizer())
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    lead = QWEN3.after("<think>\n" if inside else "").grammar_lead()
    grammar = grammars.then(lead, grammars.json_schema(schema))
    opened = "" if inside else "<think>"

    def accepts(text: str) -> bool:
        c = grammars.constraint(grammar)
        return c.advance_all(list(text.encode())) and c.finished

    assert accepts(f'{opened}{THOUGHT}</think>\n\n{{"a": 1}}')
    assert not accepts(f'{opened}{THOUGHT}</think>\n\n{{"a": "x"}}')
    assert not accepts(f'{opened}{THOUGHT}</think>      {{"a": 1}}')  # no padding the answer with whitespace
    assert accepts('{"a": 1}') is not inside  # outside, the model may answer at once


def chunk_text(chunks: list[GenerateChunk]) -> tuple[str, str]:
    return "".join(c.reasoning for c in chunks), text_of(chunks)


@pytest.mark.parametrize("style", ["qwen3", "deepseek_r1"])
async def test_the_pipeline_splits_a_chat_answer_and_counts_the_reasoning_tokens(style: str) -> None:
    engine = ScriptedEngine(WRITTEN, after=b"assistant:")
    async with serving(engine, ThinkingTokenizer(style)) as run:
        chunks = await run.generate(messages=[{"role": "user", "content": "hi"}], split_reasoning=True)
    opened = "<think>\n" if style == "deepseek_r1" else ""  # what the template wrote: the model goes on after it
    assert chunk_text(chunks) == (THOUGHT.removeprefix(opened.removeprefix("<think>")), ANSWER)
    written = WRITTEN.removeprefix(opened)
    assert chunks[-1].completion_tokens == len(written.encode())
    assert chunks[-1].reasoning_tokens == len(written.encode()) - len(ANSWER.encode())  # up to `</think>`, tags in


async def test_completions_and_a_worker_without_a_parser_keep_the_raw_text() -> None:
    async with serving(ScriptedEngine(WRITTEN), ThinkingTokenizer()) as run:
        raw = await run.generate(prompt="x")
        unsplit = await run.generate(request_id="r2", messages=[{"role": "user", "content": "hi"}])
    assert chunk_text(raw) == chunk_text(unsplit) == ("", WRITTEN)
    assert raw[-1].reasoning_tokens == 0


@pytest.mark.parametrize("max_tokens", [9, 20, len(WRITTEN.encode()) - len(ANSWER.encode()) - 2])
async def test_max_tokens_inside_the_reasoning(max_tokens: int) -> None:
    async with serving(ScriptedEngine(WRITTEN, after=b"assistant:"), ThinkingTokenizer()) as run:
        chunks = await run.generate(
            messages=[{"role": "user", "content": "hi"}], split_reasoning=True, max_tokens=max_tokens
        )
    written = WRITTEN.encode()[:max_tokens].decode(errors="ignore")
    assert chunk_text(chunks) == (written.removeprefix("<think>"), "")
    assert chunks[-1].finish_reason == "length" and chunks[-1].reasoning_tokens == max_tokens


@pytest.mark.parametrize("cut", [3, 12, len(WRITTEN.encode()) - len(ANSWER.encode()) - 4, len(WRITTEN.encode()) - 3])
async def test_a_resumed_chat_answer_sends_what_the_first_worker_had_not(cut: int) -> None:
    """The first worker generated `cut` ids and delivered what it had split of them; the next one replays them and
    sends the rest: nothing twice, nothing missing, the reasoning tokens counted once."""
    ask = {"messages": [{"role": "user", "content": "hi"}], "split_reasoning": True}
    async with serving(ScriptedEngine(WRITTEN, after=b"assistant:"), ThinkingTokenizer()) as run:
        whole = await run.generate(**ask)
        first = await run.generate(request_id="r2", max_tokens=cut, **ask)
        ids = sum((c.token_ids for c in first), [])
        # what the first worker had delivered: its whole characters, split, what may be a tag still held
        sent = QWEN3.after("").stream().push(bytes(ids).decode(errors="ignore"))
        rest = await run.generate(
            request_id="r3",
            prompt_token_ids=first[0].prompt_token_ids,
            resume_token_ids=ids,
            resume_text_chars=len(sent[1]),
            resume_reasoning_chars=len(sent[0]),
            split_reasoning=True,
        )
    r, c = chunk_text(rest)
    assert (sent[0] + r, sent[1] + c) == chunk_text(whole)
    assert rest[-1].reasoning_tokens == whole[-1].reasoning_tokens
    assert rest[-1].completion_tokens == whole[-1].completion_tokens

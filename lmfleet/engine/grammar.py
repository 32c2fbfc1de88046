"""Constrained decoding with llguidance: grammars compiled for one model's vocabulary, and the per-request
`TokenConstraint` the engines apply (lmfleet.engine.base).

Owns: turning a JSON schema or a Lark grammar (which may embed JSON schemas with `%json`) into a checked grammar for
the model's vocabulary (`Grammars`; `then` puts a Lark lead before another grammar), OpenAI's strict mode for
schemas (`closed`: no properties a schema did not declare), refusing what llguidance cannot compile (`GrammarError`,
with its reason), and `Constraint`, one request's matcher: the ids allowed next, the ids consumed, whether the output
is complete.
Does not own: which grammar a request needs (the worker: `response_format`, forced tool calls), sampling (the
engines), the vocabulary itself (each tokenizer's `grammar_vocabulary()`).

JSON is generated in one layout, `{"a": 1, "b": [1, 2]}`: one space after `:` and `,` and no other whitespace, so a
model cannot pad its output with whitespace until it runs out of tokens.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance

from lmfleet.engine.base import Tokenizer

JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class GrammarError(ValueError):
    """llguidance cannot compile the grammar (an unsupported keyword, a bad reference, a regex it does not take)."""


# Keywords whose value is a subschema, a list of them, or a map of names to them (JSON Schema 2020-12, and the
# draft-07 spellings `definitions` and a list under `items`).
_SUBSCHEMA = (
    "items",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "additionalProperties",
    "unevaluatedProperties",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
)
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keywords by which an object schema says itself what its undeclared properties may be.
_OPEN_OR_CLOSED = ("additionalProperties", "unevaluatedProperties")


def closed(schema: Any) -> Any:
    """The schema in OpenAI's strict mode (xgrammar's default): every object schema that declares properties and does
    not say what other properties may be gets `additionalProperties: false`, so a model cannot add properties the
    schema never named, nested schemas and `$defs` included. An object schema without `properties` ({"type":
    "object"}) stays any object."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(s) for name, s in out[key].items()}
    if ("properties" in out or "patternProperties" in out) and not any(k in out for k in _OPEN_OR_CLOSED):
        out["additionalProperties"] = False
    return out


def with_layout(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with lmfleet's JSON layout as its llguidance options (for a schema embedded in a Lark grammar)."""
    return {**schema, "x-guidance": JSON_LAYOUT}


class Constraint:
    """One request's grammar state (the `TokenConstraint` protocol). Used by one thread at a time: the worker
    advances it through resumed ids before admission, then only the engine touches it."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_mask: bytes) -> None:
        self._matcher = matcher
        self._eos_mask = eos_mask

    def allowed(self) -> bytes:
        if self._matcher.is_error():  # cannot happen for ids it allowed; end the output rather than sample noise
            return self._eos_mask
        return self._matcher.compute_bitmask()

    def advance(self, token_id: int) -> bool:
        return self._matcher.consume_token(token_id)

    def advance_all(self, token_ids: list[int]) -> bool:
        """Consume ids generated earlier (a resumed request); False if the grammar refuses one."""
        return self._matcher.consume_tokens(token_ids) if token_ids else True

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()


class Grammars:
    """Grammars for one model. The vocabulary is built on first use (about a second) and kept; compiling and
    matching release the GIL, so the worker calls `compile` and `constraint` in a thread."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._vocab: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def vocabulary(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._vocab is None:
                try:
                    self._vocab = self._tokenizer.grammar_vocabulary()
                except (ValueError, TypeError, AttributeError) as exc:  # e.g. a slow (Python) HF tokenizer
                    raise GrammarError(f"constrained decoding does not support this model's tokenizer: {exc}") from exc
            return self._vocab

    def json_schema(self, schema: dict[str, Any], *, strict: bool = False) -> str:
        """A grammar for JSON valid against `schema` ({"type": "object"}: any JSON object); with `strict`, against
        the schema `closed` (OpenAI's strict mode)."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(closed(schema) if strict else schema),
                overrides=JSON_LAYOUT,  # type: ignore[arg-type]
            )
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        return self._checked(grammar)

    def lark(self, text: str) -> str:
        return self._checked(llguidance.LLMatcher.grammar_from_lark(text))

    def then(self, lead: str, grammar: str) -> str:
        """A grammar for text that the Lark grammar `lead` matches, `lead` reaching the rest of the output as
        `@then`, which follows `grammar` (one this class made): e.g. free reasoning up to its closing tag, then JSON
        (lmfleet.worker.reasoning)."""
        # llguidance writes a JSON schema's grammar as its JSON grammar list, a Lark grammar as the Lark text itself
        rest = json.loads(grammar)["grammars"] if grammar.lstrip().startswith("{") else [{"lark_grammar": grammar}]
        rest[0] = {**rest[0], "name": "then"}
        return self._checked(json.dumps({"grammars": [{"lark_grammar": lead}, *rest]}))

    def constraint(self, grammar: str) -> Constraint:
        vocab = self.vocabulary
        eos = bytearray((vocab.vocab_size + 31) // 32 * 4)
        for t in vocab.eos_tokens:
            eos[t // 8] |= 1 << (t % 8)
        return Constraint(llguidance.LLMatcher(vocab, grammar, log_level=0), bytes(eos))

    def _checked(self, grammar: str) -> str:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.vocabulary)
        if is_error:
            raise GrammarError(" ".join(messages[0].split())[:500] if messages else "invalid grammar")
        return grammar

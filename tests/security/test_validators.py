"""Property tests for the request validators (lmfleet.protocol.openai, lmfleet.api.access, lmfleet.guard).

For any JSON a client can send: parsing either gives a request that keeps every documented limit and translates
into valid worker requests, or fails with a pydantic ValidationError that becomes a 400 naming a parameter the
client actually sent. Nothing else (no TypeError, no OverflowError, no 500) can come out of it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from lmfleet import errors
from lmfleet.api.access import RequestLimits
from lmfleet.guard import check_json
from lmfleet.protocol.openai import (
    MAX_CHOICES,
    MAX_N,
    MAX_NAME_CHARS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOKENS,
    SEED_MAX,
    SEED_MIN,
    ChatCompletionRequest,
    CompletionRequest,
)
from lmfleet.protocol.worker import SEED_MAX as WORKER_SEED_MAX
from lmfleet.protocol.worker import GenerateRequest

PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, small.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

# Values near and across the edges of each field, mixed with arbitrary JSON.
edge_ints = st.sampled_from([-(2**64), -1, 0, 1, 2, 16, 17, 64, 2**31, 2**63 - 1, 2**63, 2**64]) | st.integers()
edge_floats = st.sampled_from([-2.5, -0.0, 0.0, 1e-300, 0.5, 1.0, 2.0, 2.000001, math.nan, math.inf, -math.inf])
stop_values = (
    st.none()
    | st.text(max_size=300)
    | st.lists(st.text(max_size=300), max_size=6)
    | st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4)
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot", "", "USER"])
content = (
    st.none()
    | st.text(max_size=40)
    | st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}),
        max_size=3,
    )
)
message = st.fixed_dictionaries({"role": roles}, optional={"content": content, "name": st.text(max_size=300)})
knobs = {
    "model": st.none() | st.text(max_size=300),
    "n": edge_ints | json_values,
    "temperature": edge_floats | edge_ints | json_values,
    "top_p": edge_floats | json_values,
    "top_k": edge_ints,
    "presence_penalty": edge_floats,
    "frequency_penalty": edge_floats,
    "stop": stop_values | json_values,
    "seed": edge_ints | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "max_tokens": edge_ints | json_values,
    "user": st.text(max_size=300),
    "logit_bias": st.none() | st.just({}) | json_values,
}
chat_bodies = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=4) | json_values},
    optional={
        **knobs,
        "max_completion_tokens": edge_ints,
        "top_logprobs": edge_ints | json_values,
        "logprobs": json_values,
        "tools": json_values,
        "response_format": json_values,
    },
)
prompts = (
    st.text(max_size=40)
    | st.lists(st.text(max_size=10), max_size=70)
    | st.lists(st.integers(min_value=-3, max_value=2**40), max_size=8)
    | st.lists(st.lists(st.integers(min_value=0, max_value=1000), max_size=4), max_size=4)
    | json_values
)
completion_bodies = st.fixed_dictionaries(
    {"prompt": prompts}, optional={**knobs, "echo": json_values, "best_of": edge_ints, "suffix": json_values}
)

# Bodies inside every documented limit: these must always be accepted.
names = st.text(min_size=1, max_size=MAX_NAME_CHARS)
valid_knobs = {
    "model": names,
    "n": st.integers(1, MAX_N),
    "temperature": st.floats(0, 2) | st.integers(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 1_000_000),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "stop": st.none()
    | st.text(min_size=1, max_size=MAX_STOP_CHARS)
    | st.lists(st.text(min_size=1, max_size=MAX_STOP_CHARS), max_size=MAX_STOP),
    "seed": st.integers(SEED_MIN, SEED_MAX),
    "stream": st.booleans(),
    "max_tokens": st.integers(1, MAX_TOKENS),
    "user": st.text(max_size=MAX_NAME_CHARS),
    "logit_bias": st.just({}),
}
valid_message = (
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user"]), "content": st.text(max_size=40)})
    | st.fixed_dictionaries(
        {"role": st.just("tool"), "content": st.text(max_size=40), "tool_call_id": st.text(max_size=40)}
    )
    | st.fixed_dictionaries({"role": st.just("assistant")}, optional={"content": st.none() | st.text(max_size=40)})
)
valid_chat_bodies = st.fixed_dictionaries(
    {"messages": st.lists(valid_message, min_size=1, max_size=6)},
    optional={**valid_knobs, "max_completion_tokens": st.integers(1, MAX_TOKENS), "top_logprobs": st.just(0)},
)
valid_completion_bodies = st.fixed_dictionaries(
    {
        "prompt": st.text(max_size=40)
        | st.lists(st.text(max_size=10), min_size=1, max_size=4)
        | st.lists(st.integers(0, 2**31), min_size=1, max_size=8)
        | st.lists(st.lists(st.integers(0, 2**31), min_size=1, max_size=4), min_size=1, max_size=4)
    },
    optional={**valid_knobs, "echo": st.booleans(), "best_of": st.just(1), "suffix": st.just("")},
)


def _top_level_param(param: str | None) -> str | None:
    return None if param is None else param.split(".")[0]


def _check_outcome(model: type, body: dict[str, Any]) -> Any | None:
    """Validate as the route does; on failure, the 400 names a parameter the body has (or the body itself)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = errors._validation_message(exc.errors())
        assert message
        top = _top_level_param(param)
        required = {"messages"} if model is ChatCompletionRequest else {"prompt"}
        assert top is None or top in body or top in required, (param, body)
        return None


def _check_accepted(req: ChatCompletionRequest | CompletionRequest) -> None:
    assert 1 <= req.n <= MAX_N and 1 <= req.num_choices <= MAX_CHOICES
    for value in (req.temperature, req.top_p, req.presence_penalty, req.frequency_penalty):
        assert math.isfinite(value)
    assert 0 <= req.temperature <= 2 and 0 < req.top_p <= 1
    stop = req.stop or []
    assert len(stop) <= MAX_STOP and all(1 <= len(s) <= MAX_STOP_CHARS for s in stop)
    seeds = set()
    for choice in range(req.num_choices):
        gen = req.to_generate_request(f"r-{choice}", "m", choice=choice)  # valid for the worker, or it raises
        GenerateRequest.model_validate(json.loads(gen.model_dump_json()))  # and survives the wire
        if gen.seed is not None:
            assert 0 <= gen.seed <= WORKER_SEED_MAX  # OpenAI's signed seeds fold into the engines' unsigned range
            seeds.add((req.prompt_index(choice), gen.seed))
    if req.seed is not None:
        assert len(seeds) == req.num_choices  # every choice of a prompt has its own seed


@PROPERTY
@given(body=chat_bodies)
def test_chat_requests_parse_or_name_the_parameter(body: dict[str, Any]) -> None:
    req = _check_outcome(ChatCompletionRequest, body)
    if req is not None:
        _check_accepted(req)
        assert 1 <= len(req.messages)
        for m in req.messages:
            assert m.role in ("system", "developer", "user", "assistant", "tool")
            assert m.content is not None or m.role == "assistant"


@PROPERTY
@given(body=completion_bodies)
def test_completion_requests_parse_or_name_the_parameter(body: dict[str, Any]) -> None:
    req = _check_outcome(CompletionRequest, body)
    if req is not None:
        _check_accepted(req)
        assert [req.prompt_index(i) for i in range(req.num_choices)] == sorted(
            p for p in range(len(req.prompt)) for _ in range(req.n)
        )


@PROPERTY
@given(body=valid_chat_bodies)
def test_chat_requests_within_the_documented_limits_are_accepted(body: dict[str, Any]) -> None:
    _check_accepted(ChatCompletionRequest.model_validate(json.loads(json.dumps(body))))


@PROPERTY
@given(body=valid_completion_bodies)
def test_completion_requests_within_the_documented_limits_are_accepted(body: dict[str, Any]) -> None:
    _check_accepted(CompletionRequest.model_validate(json.loads(json.dumps(body))))


@PROPERTY
@given(value=st.text(min_size=1, max_size=MAX_STOP_CHARS))
def test_a_stop_string_is_a_list_of_one(value: str) -> None:
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "stop": value})
    assert req.stop == [value]
    assert req.to_generate_request("r", "m").stop == [value]


@PROPERTY
@given(
    limits=st.builds(
        RequestLimits,
        max_n=st.integers(1, MAX_N),
        max_stop=st.integers(1, MAX_STOP),
        max_stop_chars=st.integers(1, MAX_STOP_CHARS),
        max_messages=st.integers(1, 8),
        max_message_chars=st.integers(1, 30),
    ),
    n=st.integers(1, MAX_N),
    stop=st.lists(st.text(min_size=1, max_size=MAX_STOP_CHARS), max_size=MAX_STOP),
    contents=st.lists(st.text(max_size=40), min_size=1, max_size=10),
)
def test_operator_limits_refuse_exactly_what_is_over_them(
    limits: RequestLimits, n: int, stop: list[str], contents: list[str]
) -> None:
    body = {"n": n, "stop": stop, "messages": [{"role": "user", "content": c} for c in contents]}
    req = ChatCompletionRequest.model_validate(body)
    over = {
        "n": n > limits.max_n,
        "stop": len(stop) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stop),
        "messages": len(contents) > limits.max_messages or any(len(c) > limits.max_message_chars for c in contents),
    }
    try:
        limits.check(req)
    except errors.InvalidRequest as exc:
        assert exc.status == 400 and exc.param is not None
        assert over[exc.param.split(".")[0]], exc.param
        assert exc.body()["error"]["param"] == exc.param
    else:
        assert not any(over.values())


@PROPERTY
@given(value=st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_guard_round_trips_any_json_object(value: dict[str, Any]) -> None:
    text = json.dumps(value)  # NaN/Infinity included: Python's JSON writes them and the guard leaves them be
    parsed = check_json(text.encode())
    assert json.dumps(parsed) == text


@PROPERTY
@given(data=st.binary(max_size=200))
def test_guard_never_fails_other_than_with_a_400(data: bytes) -> None:
    try:
        assert isinstance(check_json(data), dict)
    except errors.InvalidRequest as exc:
        assert exc.status == 400 and exc.message


@PROPERTY
@given(value=st.dictionaries(st.text(min_size=1, max_size=5), scalars, min_size=1, max_size=5), data=st.data())
def test_guard_refuses_any_duplicated_key(value: dict[str, Any], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(value)))
    text = json.dumps(value)
    duplicated = text[:-1] + ", " + json.dumps(key) + ": 1}"
    with pytest.raises(errors.InvalidRequest, match="more than once"):
        check_json(duplicated.encode())

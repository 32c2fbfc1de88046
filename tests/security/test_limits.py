"""Limits and out-of-range values on the API server: each refusal is a 400 that names the parameter, and the
request never reaches a worker."""

from __future__ import annotations

import pytest

from lmfleet.api.access import RequestLimits
from tests.api.fakes import assert_error, serve

USER = {"role": "user", "content": "hello there"}
CHAT = {"model": "echo", "messages": [USER]}
COMPLETION = {"model": "echo", "prompt": "hello there"}
TIGHT = RequestLimits(max_n=2, max_stop=2, max_stop_chars=5, max_messages=3, max_message_chars=20)


@pytest.mark.parametrize(
    ("route", "patch", "param"),
    [
        ("/v1/chat/completions", {"n": 3}, "n"),
        ("/v1/completions", {"n": 3}, "n"),
        ("/v1/chat/completions", {"stop": ["a", "b", "c"]}, "stop"),
        ("/v1/chat/completions", {"stop": "toolong"}, "stop.0"),
        ("/v1/completions", {"stop": ["ok", "toolong"]}, "stop.1"),
        ("/v1/chat/completions", {"messages": [USER] * 4}, "messages"),
        ("/v1/chat/completions", {"messages": [USER, {"role": "user", "content": "x" * 21}]}, "messages.1.content"),
        ("/", {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 21}]}]}, "messages.0.content"),
        ("/v1/completions", {"prompt": "z" * 21}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", "z" * 21]}, "prompt"),
    ],
)
async def test_operator_limits_name_the_parameter(route: str, patch: dict, param: str) -> None:
    base = COMPLETION if route == "/v1/completions" else CHAT
    async with serve(limits=TIGHT) as api:
        err = assert_error(await api.raw.post(route, json={**base, **patch}), 400, param=param)
        assert "on this server" in err["message"]
        assert api.fleet.workers["a"].requests == []


async def test_requests_at_the_limits_pass() -> None:
    async with serve(limits=TIGHT) as api:
        chat = {**CHAT, "n": 2, "stop": ["abcde", "x"], "messages": [USER, USER, {"role": "user", "content": "y" * 20}]}
        assert (await api.raw.post("/v1/chat/completions", json=chat)).status_code == 200
        completion = {**COMPLETION, "n": 2, "prompt": ["a b", "z" * 20], "stop": "abcde"}
        assert (await api.raw.post("/v1/completions", json=completion)).status_code == 200


def test_limits_can_only_tighten() -> None:
    for bad in ({"max_n": 0}, {"max_n": 17}, {"max_stop": 5}, {"max_stop_chars": 257}, {"max_messages": 2049},
                {"max_message_chars": 0}, {"max_n": True}, {"max_n": 2.0}):  # fmt: skip
        with pytest.raises(ValueError):
            RequestLimits(**bad)


# Raw JSON: NaN and Infinity are what Python's json (and some clients) send; the models refuse them by name.
NON_FINITE = [
    ('"temperature": NaN', "temperature"),
    ('"temperature": Infinity', "temperature"),
    ('"top_p": -Infinity', "top_p"),
    ('"presence_penalty": NaN', "presence_penalty"),
    ('"frequency_penalty": 1e999', "frequency_penalty"),
    ('"seed": NaN', "seed"),
    ('"max_tokens": Infinity', "max_tokens"),
    ('"n": NaN', "n"),
]


@pytest.mark.parametrize(("field", "param"), NON_FINITE)
async def test_non_finite_numbers_name_the_parameter(field: str, param: str) -> None:
    body = '{"model": "echo", "messages": [{"role": "user", "content": "hi"}], ' + field + "}"
    async with serve() as api:
        resp = await api.raw.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert_error(resp, 400, param=param)
        assert api.fleet.workers["a"].requests == []


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        # negative and out of range
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": -1}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 5}, "top_logprobs"),  # in range, but without logprobs: true
        # wrong types
        ({"n": "2"}, "n"),
        ({"n": True}, "n"),
        ({"n": 2.5}, "n"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": False}, "temperature"),
        ({"seed": "42"}, "seed"),
        ({"stream": 1}, "stream"),
        ({"stop": {"a": 1}}, "stop"),
        ({"stop": [1, 2]}, "stop.0"),
        ({"stop": [""]}, "stop.0"),
        ({"model": 7}, "model"),
        ({"model": "m" * 257}, "model"),
        ({"user": ["x"]}, "user"),
        # messages: empty, unknown roles, wrong shapes
        ({"messages": []}, "messages"),
        ({"messages": {"role": "user", "content": "hi"}}, "messages"),
        ({"messages": ["hi"]}, "messages.0"),
        ({"messages": [None]}, "messages.0"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": None, "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "function", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "User", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [USER, {"role": "system"}]}, "messages.1.content"),
        ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "hi", "name": "n" * 257}]}, "messages.0.name"),
        ({"messages": [USER] * 2049}, "messages"),
    ],
)
async def test_out_of_range_and_wrong_types_name_the_parameter(patch: dict, param: str) -> None:
    async with serve() as api:
        assert_error(await api.raw.post("/v1/chat/completions", json={**CHAT, **patch}), 400, param=param)
        assert api.fleet.workers["a"].requests == []


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"prompt": [-1, 5]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": ["x"] * 65}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"echo": "yes"}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 6}, "logprobs"),
    ],
)
async def test_completions_out_of_range_name_the_parameter(patch: dict, param: str) -> None:
    async with serve() as api:
        assert_error(await api.raw.post("/v1/completions", json={**COMPLETION, **patch}), 400, param=param)
        assert api.fleet.workers["a"].requests == []


async def test_null_means_default_and_off_values_pass() -> None:
    async with serve() as api:
        nulls = {"n": None, "temperature": None, "top_p": None, "stream": None, "max_tokens": None, "top_logprobs": 0}
        assert (await api.raw.post("/v1/chat/completions", json={**CHAT, **nulls})).status_code == 200
        ints_as_floats = {"temperature": 1, "top_p": 1, "presence_penalty": 0}  # JSON has one number type
        assert (await api.raw.post("/v1/chat/completions", json={**CHAT, **ints_as_floats})).status_code == 200

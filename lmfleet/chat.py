"""`lmfleet chat`: a terminal chat with any OpenAI-compatible endpoint (ours, vLLM, llama.cpp, OpenAI itself).

Owns the command line, the conversation (every turn is sent again, as the API is stateless), streaming the reply to
the terminal as it comes (`POST {base_url}/chat/completions` with `stream: true`, SSE), and the keys:

    Enter               send the line
    a line ending in \\  continue on the next line; a line `\"\"\"` opens (and another closes) a multi-line block
    Ctrl-C              while a reply streams: stop it (the connection closes, so the server cancels the
                        generation) and come back to the prompt; at the prompt, twice in a row: quit
    Ctrl-D              quit
    /model [NAME]       switch model (no NAME: list the models)
    /system [TEXT]      set the system prompt (no TEXT: clear it)
    /clear              forget the conversation;  /help;  /quit

Input is read with the standard library (`input()`, with line editing and history where `readline` exists), so it
also reads a script from a pipe. Does not own: any server; tokens (the server counts them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
PROMPT, MORE = "> ", "… "
HELP = """commands: /model [NAME]  /system [TEXT]  /clear  /help  /quit
keys: Enter sends; end a line with \\ (or open a block with \"\"\") for more lines;
      Ctrl-C stops a reply; Ctrl-C twice at the prompt, or Ctrl-D, quits"""


class ChatError(Exception):
    """The endpoint refused or failed; the message is for the user."""


@dataclass
class Chat:
    """One conversation with an endpoint."""

    http: httpx.Client
    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def models(self) -> list[str]:
        resp = self.http.get("models")
        if resp.status_code != 200:
            raise ChatError(_error_message(resp.status_code, resp.text))
        return [card["id"] for card in resp.json()["data"]]

    def request(self, text: str) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [*system, *self.history, {"role": "user", "content": text}],
            "stream": True,
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def reply(self, text: str) -> Generator[str, None, None]:
        """Stream the answer to `text`, delta by delta; the turn joins the history once it is over, or once it is
        cut short (closing the iterator, as Ctrl-C does, closes the connection: the server stops generating)."""
        answer: list[str] = []
        try:
            with self.http.stream("POST", "chat/completions", json=self.request(text)) as resp:
                if resp.status_code != 200:
                    raise ChatError(_error_message(resp.status_code, resp.read().decode(errors="replace")))
                for data in _sse_data(resp.iter_lines()):
                    event = json.loads(data)
                    if "error" in event:
                        raise ChatError(_error_message(None, data))
                    for choice in event.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            answer.append(delta)
                            yield delta
        finally:
            if answer:
                self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield data


def _error_message(status: int | None, body: str) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.strip()[:500] or "no details"
    return f"{status}: {message}" if status else message


# ---------------------------------------------------------------------------------------------------------------
# The terminal


class Terminal:
    """Reads what the user types (multi-line conventions included) and runs commands and turns."""

    def __init__(self, chat: Chat, out: TextIO = sys.stdout) -> None:
        self.chat = chat
        self.out = out

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def read(self) -> str:
        """One message: a line, lines joined by a trailing backslash, or a block between two `\"\"\"` lines."""
        line = input(PROMPT)
        if line.strip() == '"""':
            lines = []
            while (line := input(MORE)).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = input(MORE)
        return "\n".join([*lines, line])

    def run(self) -> int:
        self.say(f"lmfleet chat · {self.chat.http.base_url} · model {self.chat.model} · /help for commands")
        interrupted = False
        while True:
            try:
                text = self.read()
            except EOFError:
                self.say("")
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    self.say("")
                    return 0
                interrupted = True
                self.say("\n(Ctrl-C again or Ctrl-D to quit)")
                continue
            interrupted = False
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    if self.command(text) is False:
                        return 0
                else:
                    self.turn(text)
            except KeyboardInterrupt:
                self.say("\n[interrupted]")
            except ChatError as exc:
                self.say(f"error: {exc}")
            except httpx.HTTPError as exc:
                self.say(f"error: cannot reach {self.chat.http.base_url}: {exc}")

    def turn(self, text: str) -> None:
        replies = self.chat.reply(text)
        try:
            for delta in replies:
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            replies.close()
            self.say("\n[stopped]")
            return
        self.say("")

    def command(self, text: str) -> bool:
        """Run a /command; False to quit."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/clear":
            self.chat.history.clear()
            self.say("(conversation cleared)")
        elif name == "/system":
            self.chat.system = arg or None
            self.say(f"(system prompt: {arg})" if arg else "(system prompt cleared)")
        elif name == "/model":
            models = self.chat.models()
            if not arg:
                self.say("models: " + ", ".join(f"[{m}]" if m == self.chat.model else m for m in models))
            elif arg not in models:
                self.say(f"(no model {arg!r} here; models: {', '.join(models)})")
            else:
                self.chat.model = arg
                self.say(f"(model: {arg})")
        else:
            self.say(f"(unknown command {name}; /help lists them)")
        return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmfleet chat",
        description="Chat in the terminal with an OpenAI-compatible endpoint, streaming.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="API root, ending in /v1 (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY; none when unset)")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /models)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on each reply (default: the server's)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ctrl-C is this program's stop key, so it owns SIGINT: a process started in the background by a non-interactive
    # shell (a script's `&`, many job runners) inherits SIGINT ignored, and Python keeps it so: the terminal would
    # echo ^C and the reply would go on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    base_url = args.base_url.rstrip("/") + "/"
    with httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(args.timeout, connect=10)) as http:
        chat = Chat(http, args.model, args.system, args.temperature, args.max_tokens)
        if chat.model is None:
            try:
                models = chat.models()
            except (ChatError, httpx.HTTPError) as exc:
                print(f"lmfleet chat: cannot list the models at {base_url}: {exc}", file=sys.stderr)
                return 1
            if not models:
                print(f"lmfleet chat: {base_url} serves no model; name one with --model", file=sys.stderr)
                return 1
            chat.model = models[0]
        return Terminal(chat).run()

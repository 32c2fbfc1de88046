"""Which worker probably holds a request's prompt in its prefix cache: the key of a prompt and the record of who was
sent which, for the `cache_aware` dispatch policy (lmfleet.dispatch).

The API server sees messages, not token ids, so a prompt is keyed by text. `prefix_key` turns a `GenerateRequest`
into a chain of hashes, one per link, each hash covering everything before it:

  * the preamble seeds the chain and is no link of its own: the model, the tools offered, the template variables
    and the system (developer) messages that open the conversation. Conversations share it, so holding it is no
    reason to send a new conversation to one worker rather than spread new conversations evenly;
  * then one link per message (chat), or per `BLOCK_CHARS` characters of a raw prompt, or per `BLOCK_IDS` token ids.

A conversation's next turn repeats the previous turn's messages, so its chain passes through the previous turn's last
link, which the worker that served it holds. A Responses chain (`previous_response_id`) is rendered as the earlier
turns' messages followed by the new input (lmfleet.api.responses), so it is found the same way. Each link also says
how many characters of the prompt it covers (`Link.chars`): how much a worker holding it would not compute again.
Only the last `KEY_LINKS` links are kept: each hash covers its whole prefix, and a match is found from the end.

Two sources say who holds a link, and `affinity` reads both:

  * this API server's own record (`PrefixRecord.sent`): every link of every request, with the worker it was sent to
    (the last few workers per link), in a bounded LRU. Immediate, approximate (a worker's cache may have dropped it).
    It also counts the requests sent to each worker lately (`Affinity.recent`, halved every `HALF_LIFE` dispatches),
    by which the policy spreads new conversations: a count of everything ever sent would hold finished
    conversations against a worker, and load reports are a heartbeat old;
  * the workers' own reports (`PrefixRecord.reported`, from the `/workers` view): a worker records the prefix
    hashes each request carries (`GenerateRequest.prefix_hashes`: its last `REPORTED_LINKS` links, `for_worker`)
    and heartbeats the most recent ones (`WorkerStatus.prefix_hashes`). A next turn's chain passes through its
    previous turn's last link (a chat turn's last message), or its next-to-last (a raw prompt's last block, when
    partial), so those are enough, and a worker's report holds a thousand requests in a few tens of kilobytes.
    They reach every API server in front of the fleet, one that restarted included, a heartbeat and a refresh late
    (a turn that comes through another server sooner than that after its previous turn is not found this way); a
    worker that dies or leaves takes its report with it.

Why both (not measured apart; the reasons are structural): the record alone cannot serve several API servers (a
conversation whose turns arrive through different servers, or a server that restarted, would find nothing); the
reports alone lag a heartbeat plus a refresh, so a conversation's quick next turn would miss. A worker that is
ejected, or leaves the view, has its entries in the record dropped (`forget`): a replica that comes back at the same
address starts with an empty cache; and only live, healthy candidates are ever scored, so nothing routes to a dead
replica. The key is computed once per choice (lmfleet.api.upstream) and every worker tried for it, a resume's
included, is recorded as holding it.

Does not own: the pick (lmfleet.dispatch), the fleet view and health (lmfleet.api.routing), what the worker records
(lmfleet.worker.prefixes). No I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from lmfleet.dispatch import Affinity
from lmfleet.protocol.worker import MAX_PREFIX_HASH, MAX_PREFIX_HASHES, ChatMessageIn, GenerateRequest

BLOCK_CHARS = 256  # a raw prompt's link
BLOCK_IDS = 64  # a token-id prompt's link
KEY_LINKS = 64  # links of a key (its last ones)
REPORTED_LINKS = 2  # links of a key a worker is told of, and reports
RECORD_SIZE = 65_536  # links this API server remembers
HOLDERS = 4  # workers remembered per link (the last ones it was sent to)
HALF_LIFE = 16  # dispatches after which a request counts half in a worker's `recent`
_PREAMBLE_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Link:
    hash: int  # of everything up to the end of this link, the preamble included
    chars: int  # characters of the prompt up to the end of this link (token ids count as characters)


def _hash(previous: bytes, piece: str | bytes) -> bytes:
    data = piece.encode() if isinstance(piece, str) else piece
    return hashlib.blake2b(previous + data, digest_size=8).digest()


def _as_int(digest: bytes) -> int:
    return int.from_bytes(digest, "big") & MAX_PREFIX_HASH


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _message(message: ChatMessageIn) -> str:
    return _canonical(message.model_dump(exclude_none=True))


def prefix_key(model: str, request: GenerateRequest) -> tuple[Link, ...]:
    """The chain of links of `request`'s prompt for `model` (the last KEY_LINKS of them); empty for a prompt
    with nothing past its preamble."""
    preamble: list[object] = [model, [t.model_dump(exclude_none=True) for t in request.tools]]
    pieces: list[str | bytes] = []
    if request.messages is not None:
        messages = list(request.messages)
        opening = 0
        while opening < len(messages) and messages[opening].role in _PREAMBLE_ROLES:
            opening += 1
        preamble += [request.chat_template_kwargs, [_message(m) for m in messages[:opening]]]
        pieces = [_message(m) for m in messages[opening:]]
    elif request.prompt is not None:
        preamble.append("prompt")
        text = request.prompt
        pieces = [text[i : i + BLOCK_CHARS] for i in range(0, len(text), BLOCK_CHARS)]
    elif request.prompt_token_ids is not None:
        preamble.append("ids")
        ids = request.prompt_token_ids
        pieces = [
            b"".join(i.to_bytes(4, "big", signed=False) for i in ids[j : j + BLOCK_IDS])
            for j in range(0, len(ids), BLOCK_IDS)
        ]
    digest = _hash(b"", _canonical(preamble))
    chars = 0
    links: list[Link] = []
    for piece in pieces:
        digest = _hash(digest, piece)
        chars += len(piece) if isinstance(piece, str) else len(piece) // 4
        links.append(Link(_as_int(digest), chars))
    return tuple(links[-KEY_LINKS:])


def for_worker(key: Sequence[Link]) -> list[int]:
    """The hashes a request keyed `key` tells its worker (`GenerateRequest.prefix_hashes`)."""
    return [link.hash for link in key[-REPORTED_LINKS:]][-MAX_PREFIX_HASHES:]


class PrefixRecord:
    """Who holds which prompt prefix, as far as this API server knows: what it sent where, and what the workers
    report. One per API server (the router's)."""

    def __init__(self, size: int = RECORD_SIZE) -> None:
        self._size = size
        self._sent: OrderedDict[int, tuple[str, ...]] = OrderedDict()  # link hash -> workers, latest first
        self._count: Counter[str] = Counter()  # entries of _sent per worker
        self._reported: dict[str, frozenset[int]] = {}
        self._dispatches = 0
        self._recent: dict[str, tuple[float, int]] = {}  # worker -> (requests lately, as of dispatch number)

    def _recent_of(self, address: str) -> float:
        count, when = self._recent.get(address, (0.0, 0))
        return count * 0.5 ** ((self._dispatches - when) / HALF_LIFE)

    def sent(self, key: Sequence[Link], address: str) -> None:
        """A request keyed `key` went to `address`: it will hold every link."""
        self._dispatches += 1
        self._recent[address] = (self._recent_of(address) + 1, self._dispatches)
        for link in key:
            holders = self._sent.pop(link.hash, ())
            if address not in holders:
                self._count[address] += 1
                if len(holders) >= HOLDERS:
                    self._uncount(holders[-1:])
                    holders = holders[:-1]
            self._sent[link.hash] = (address, *(a for a in holders if a != address))
        while len(self._sent) > self._size:
            _, holders = self._sent.popitem(last=False)
            self._uncount(holders)

    def _uncount(self, addresses: Iterable[str]) -> None:
        for a in addresses:
            self._count[a] -= 1
            if self._count[a] <= 0:
                del self._count[a]

    def reported(self, reports: Mapping[str, Sequence[int]]) -> None:
        """The workers' own reports (worker address -> the prefix hashes it heartbeats), the whole view at once:
        a worker not in it has left, and its record goes with it."""
        for address in (set(self._count) | set(self._recent)) - set(reports):
            self.forget(address)
        self._reported = {a: frozenset(hashes) for a, hashes in reports.items()}

    def forget(self, address: str) -> None:
        """Drop what this server sent to `address` (ejected or gone: its cache is not to be counted on, and when it
        comes back it holds no conversation)."""
        self._recent.pop(address, None)
        if address not in self._count:
            return
        for h, holders in list(self._sent.items()):
            if address in holders:
                rest = tuple(a for a in holders if a != address)
                if rest:
                    self._sent[h] = rest
                else:
                    del self._sent[h]
        del self._count[address]

    def affinity(self, key: Sequence[Link], addresses: Collection[str]) -> dict[str, Affinity]:
        """Per worker of `addresses`: the characters of `key` it holds (up to the last link it holds), and the
        requests this server sent it lately."""
        matched: dict[str, int] = {}
        for link in reversed(key):
            if len(matched) == len(addresses):
                break
            holders = self._sent.get(link.hash, ())
            for a in addresses:
                if a not in matched and (a in holders or link.hash in self._reported.get(a, ())):
                    matched[a] = link.chars
        return {a: Affinity(matched=matched.get(a, 0), recent=self._recent_of(a)) for a in addresses}

"""A worker's heartbeats (lmfleet.worker.registration): every interval, and soon after the worker has news for the API
servers (a prompt prefix it had not served: lmfleet.worker.prefixes)."""

from __future__ import annotations

import asyncio

from lmfleet.protocol.worker import WorkerStatus
from lmfleet.worker.prefixes import ServedPrefixes
from lmfleet.worker.registration import Registration


class Controller:
    """Stands in for lmfleet.client.ControllerClient: records what it is sent."""

    address = "http://controller"

    def __init__(self) -> None:
        self.registered = 0
        self.beats: list[WorkerStatus] = []
        self.beat = asyncio.Event()

    async def register(self, _address: str, _status: WorkerStatus) -> None:
        self.registered += 1
        self.beat.set()

    async def heartbeat(self, _address: str, status: WorkerStatus) -> bool:
        self.beats.append(status)
        self.beat.set()
        return True

    async def unregister(self, _address: str) -> None:
        pass


async def test_news_of_a_new_prefix_is_heartbeaten_without_waiting_for_the_interval() -> None:
    controller, prefixes = Controller(), ServedPrefixes()
    membership = Registration(
        [controller],  # type: ignore[list-item]
        "http://worker",
        status=lambda: WorkerStatus(model_names=["m"], prefix_hashes=prefixes.recent()),
        serving=lambda: True,
        interval_s=3600,
        early=prefixes.news,
    )
    membership.start()
    try:
        await controller.beat.wait()
        assert controller.registered == 1 and controller.beats == []
        controller.beat.clear()
        prefixes.served([7])  # pytest-timeout bounds the wait: an hour's interval would fail it
        await controller.beat.wait()
        assert controller.beats[-1].prefix_hashes == [7]
        controller.beat.clear()
        prefixes.served([7])  # nothing new: no early heartbeat
        assert not prefixes.news.is_set()
    finally:
        await membership.leave()

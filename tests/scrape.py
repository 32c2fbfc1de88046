"""Reading a /metrics answer back, as Prometheus would: parsed with prometheus_client's own parser."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Scrape:
    text: str
    samples: dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value) for each series
    types: dict[str, str]  # family name -> counter | gauge | histogram ...

    def value(self, name: str, **labels: str) -> float:
        """The sum over the series of `name` whose labels include `labels` (0 when there is none)."""
        return sum(v for got, v in self.samples.get(name, []) if labels.items() <= got.items())

    def labels(self, name: str) -> list[dict[str, str]]:
        return [got for got, _ in self.samples.get(name, [])]


def parse(text: str) -> Scrape:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return Scrape(text, samples, types)


async def scrape(client: httpx.AsyncClient, url: str = "/metrics", **kw: object) -> Scrape:
    resp = await client.get(url, **kw)  # type: ignore[arg-type]
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain"), resp.headers
    return parse(resp.text)

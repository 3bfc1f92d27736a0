"""``/metrics`` of a Serve deployment: every replica's series, each labelled with its replica id.

Through Serve, a scrape of ``/metrics`` reaches one replica at random, and each replica has
its own prometheus-client registry. So each replica publishes its exposition text to one
small named Ray actor (:class:`MetricsBoard`, no CPU reserved) every few seconds and at each
scrape; the replica answering a scrape returns the union of the fresh snapshots, every
sample labelled ``replica="<id>"``. A replica that stopped publishing (dead) drops out after
:data:`STALE_AFTER_S`. Sum over ``replica`` in PromQL for deployment-wide numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping

import ray
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

logger = logging.getLogger(__name__)

#: Seconds between a replica's background publications.
PUBLISH_EVERY_S = 5.0
#: A snapshot older than this is from a replica that is gone.
STALE_AFTER_S = 3 * PUBLISH_EVERY_S


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The latest exposition text of each replica, with the time it was published."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self._texts[replica] = (time.time(), text)

    def forget(self, replica: str) -> None:
        self._texts.pop(replica, None)

    def fresh(self, max_age_s: float) -> dict[str, str]:
        now = time.time()
        return {replica: text for replica, (at, text) in self._texts.items() if now - at <= max_age_s}


def board(app_name: str) -> ray.actor.ActorHandle:
    """The application's board (created by the first replica that asks; outlives replicas)."""
    return MetricsBoard.options(  # type: ignore[attr-defined]
        name=f"{app_name}-metrics-board", namespace="llm_server", lifetime="detached", get_if_exists=True,
    ).remote()


def own_text() -> str:
    """This process's exposition text."""
    return generate_latest(REGISTRY).decode("utf-8")


class _Merged:
    """A collector yielding the families of several replicas, samples labelled by replica."""

    def __init__(self, texts: Mapping[str, str]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                merged.samples.extend(_labelled(family.samples, replica))
        yield from families.values()


def _labelled(samples: Iterable[Sample], replica: str) -> Iterator[Sample]:
    for sample in samples:
        yield sample._replace(labels={**sample.labels, "replica": replica})


def merged_text(texts: Mapping[str, str]) -> bytes:
    """One exposition of all replicas' texts (``replica`` label added to every sample)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(texts))
    return generate_latest(registry)

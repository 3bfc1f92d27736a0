"""Prefix affinity, the router's half: a Ray Serve request router that sends each session to
"its" replica, unless that replica is overloaded.

Serve's default router (power of two choices on queue length) spreads the turns of one
conversation over every replica, so each replica's prefix cache sees a fraction of them.
:class:`PrefixAffinityRouter` reads the request's session id (``x-session-id``: the client's,
or the ``prefix-<hash>`` that :mod:`.affinity` derives from the conversation's opening) and:

- ranks the replicas by rendezvous hashing (highest ``hash(session, replica id)`` first), so a
  session always prefers the same replica, and only the sessions of a replica that leaves move;
- sends the request to the first-ranked replica while its load (the requests Serve has in
  flight on it) is at most ``max_imbalance`` above the second-ranked replica's; beyond that the
  request goes to the less loaded of the second-ranked and one random other replica (load is the
  tie-breaker: a cold prefill elsewhere beats a long queue here). The overflow of a session also
  lands on one replica, its second choice, whose cache then holds it too;
- routes a request without a session id by power of two choices, as Serve's default does.

A replica at ``max_ongoing_requests`` refuses, and the next rank is tried (Serve's rejection
protocol), so affinity never routes into a full replica. Ray Serve 2.60's own routers were
looked at first: ``PrefixCacheAffinityRouter`` (ray.serve.llm) needs the prompt among the
handle call's arguments, which an HTTP request through the proxy does not have when it is
routed (the replica reads the body later); the experimental ``ConsistentHashRouter`` has
session stickiness but no load tie-breaker (it leaves a replica only when it refuses).
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

#: Under Serve's logger, so the lines land in the proxy's Serve log (``logs/serve/proxy_*.log``).
logger = logging.getLogger(f"ray.serve.{__name__}")

#: The import path Serve's ``request_router_config`` names.
ROUTER_PATH = "llm_server.scale_out.affinity_router:PrefixAffinityRouter"
#: Backoff index of the load probe: Serve's 0.1 s deadline x 2**3, capped by its max (1 s); a busy
#: replica (prefilling on a shared CPU) answers the probe late, and an unanswered probe undercounts.
PROBE_BACKOFF = 3


def rendezvous_order(session: str, replica_ids: list[str]) -> list[str]:
    """``replica_ids`` by preference for ``session``, most preferred first (rendezvous hashing)."""

    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{session}\x00{replica}".encode("utf-8", "surrogatepass"), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixAffinityRouter(RequestRouter):
    """Session affinity with load as the tie-breaker (see the module docstring)."""

    def initialize_state(self, **kwargs: Any) -> None:
        """``max_imbalance``: how many more in-flight requests the preferred replica may hold than
        the second choice before a request goes elsewhere (``request_router_kwargs``)."""
        max_imbalance = kwargs.get("max_imbalance", 16)
        if not isinstance(max_imbalance, int) or isinstance(max_imbalance, bool) or max_imbalance < 0:
            raise ValueError(f"max_imbalance must be a non-negative int, got {max_imbalance!r}")
        self._max_imbalance = max_imbalance
        logger.info("prefix-affinity router for %s: max_imbalance=%d", self._deployment_id, max_imbalance)

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int | None]:
        """In-flight requests per replica, asked of the replicas (one small RPC each, in parallel,
        within Serve's queue-length deadline); the router's cache where a replica did not answer.
        Asked, not cached: with three long streams in flight on one replica, the cache read 1 (seen in
        tests/test_scale_out_affinity.py): it undercounts exactly the streams that load a replica."""
        cache = self._replica_queue_len_cache
        return {replica.replica_id: cache.get(replica.replica_id) if queue_len is None else queue_len
                for replica, queue_len in await self._probe_queue_lens(replicas, PROBE_BACKOFF)}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas to try, best first (Serve picks the least loaded within a rank)."""
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off once every rank refused
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if not session or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        ranked = [by_id[unique] for unique in rendezvous_order(session, list(by_id))]
        preferred, second, rest = ranked[0], ranked[1], ranked[2:]
        overflow = [second, *random.sample(rest, min(1, len(rest)))]
        loads = await self._loads([preferred, second])
        here, there = loads.get(preferred.replica_id), loads.get(second.replica_id)
        if here is not None and there is not None and here - there > self._max_imbalance:
            logger.debug("session %s: replica %s holds %d requests, %s holds %d: overflow",
                         session, preferred.replica_id.unique_id, here, second.replica_id.unique_id, there)
            return [overflow, [preferred], rest]
        return [[preferred], overflow, rest]

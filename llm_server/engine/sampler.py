"""Batched next-token selection with per-request settings, on the logits' device.

All rows of a step are processed together (repetition penalty, temperature, top-k, top-p, in
``model.generate``'s order), and the
only host synchronisation is reading the chosen ids. Sampling uses the exponential-race form
of the Gumbel-max trick (``argmax(p / E)``, ``E ~ Exp(1)``), so each seeded request draws its
noise from its own ``torch.Generator`` and its output does not depend on the other requests
in the batch.

Constrained requests (``params.constraint``) carry a grammar matcher: before the penalty-free
choice their rows are masked to the ids the grammar allows, and every accepted id advances it;
unconstrained rows of the same step are untouched. Requests with ``params.logprobs`` get each
chosen id's log-probability (and the likeliest alternatives) under the model's raw distribution
recorded into their ``logprob_sink``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llm_server.engine.types import SamplingParams, TokenLogprob

if TYPE_CHECKING:  # the grammar library is an optional extra, needed only by constrained requests
    from llm_server.engine.constraints import GrammarMatcher


@dataclass
class SamplerState:
    """Per-request sampling state kept across steps."""

    params: SamplingParams
    generator: torch.Generator | None = None  # set for seeded requests
    presence: torch.Tensor | None = None  # [vocab] bool, seen ids (repetition penalty only)
    matcher: GrammarMatcher | None = None  # constrained requests only

    @classmethod
    def create(
        cls, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device
    ) -> SamplerState:
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        presence = None
        if params.repetition_penalty != 1.0:
            presence = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                presence[torch.tensor(prompt_ids, device=device)] = True
        matcher = params.constraint.matcher() if params.constraint is not None else None
        return cls(params=params, generator=generator, presence=presence, matcher=matcher)

    def observe(self, token_id: int) -> None:
        """Record a generated id (for the repetition penalty and the grammar)."""
        if self.presence is not None and 0 <= token_id < self.presence.numel():
            self.presence[token_id] = True
        if self.matcher is not None:
            self.matcher.advance(token_id)


class Sampler:
    """Chooses one next id per row of a logits batch."""

    def __init__(self, device: torch.device, seed: int | None = None, top_k: int = 0) -> None:
        """``top_k`` (0: off) applies to every sampled request, as ``model.generate`` does."""
        self._top_k = top_k
        self._generator = torch.Generator(device=device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def select(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> list[int]:
        """``logits``: [n, vocab] float32, row i belonging to ``states[i]``."""
        raw = logits
        logits = _apply_grammar(self._apply_repetition_penalty(logits, states), states)
        chosen = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampled_rows:
            chosen[sampled_rows] = self._sample(logits[sampled_rows], [states[i] for i in sampled_rows])
        ids = [int(t) for t in chosen.tolist()]
        _record_logprobs(raw, ids, states)
        return ids

    @staticmethod
    def _apply_repetition_penalty(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        rows = [i for i, s in enumerate(states) if s.presence is not None]
        if not rows:
            return logits
        presence = torch.stack([states[i].presence for i in rows])  # type: ignore[misc]
        penalty = torch.tensor(
            [states[i].params.repetition_penalty for i in rows], dtype=logits.dtype, device=logits.device
        ).unsqueeze(1)
        sub = logits[rows]
        penalised = torch.where(sub < 0, sub * penalty, sub / penalty)
        logits = logits.clone()
        logits[rows] = torch.where(presence, penalised, sub)
        return logits

    def _sample(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        temperature = torch.tensor(
            [s.params.temperature for s in states], dtype=logits.dtype, device=logits.device
        ).unsqueeze(1)
        logits = logits / temperature
        if 0 < self._top_k < logits.shape[-1]:
            kth = torch.topk(logits, self._top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        top_p_rows = [i for i, s in enumerate(states) if s.params.top_p < 1.0]
        if top_p_rows:
            top_p = torch.tensor([states[i].params.top_p for i in top_p_rows], device=logits.device)
            logits[top_p_rows] = _top_p_filter(logits[top_p_rows], top_p)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        shared_rows = [i for i, s in enumerate(states) if s.generator is None]
        if shared_rows:
            noise[shared_rows] = noise[shared_rows].exponential_(generator=self._generator)
        for i, state in enumerate(states):
            if state.generator is not None:
                noise[i].exponential_(generator=state.generator)
        return (probs / noise).argmax(dim=-1)


def _apply_grammar(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    """Rows of constrained requests keep only the ids their grammar allows next."""
    rows = [i for i, s in enumerate(states) if s.matcher is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    allowed = torch.stack([states[i].matcher.allowed(vocab) for i in rows])  # type: ignore[union-attr]
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits


def _record_logprobs(raw: torch.Tensor, ids: list[int], states: Sequence[SamplerState]) -> None:
    """Append each logprobs request's chosen id (and top alternatives) to its sink."""
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None and s.params.logprob_sink is not None]
    if not rows:
        return
    logp = torch.log_softmax(raw[rows].float(), dim=-1)
    chosen = torch.tensor([ids[i] for i in rows], device=logp.device).unsqueeze(1)
    picked = logp.gather(1, chosen).squeeze(1).tolist()
    k = min(max(states[i].params.logprobs or 0 for i in rows), logp.shape[-1])
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if k > 0:
        top = torch.topk(logp, k, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    for j, i in enumerate(rows):
        n = states[i].params.logprobs or 0
        top_pairs = tuple(zip(top_ids[j][:n], top_values[j][:n], strict=True))
        states[i].params.logprob_sink.append(TokenLogprob(ids[i], picked[j], top_pairs))  # type: ignore[union-attr]


def _top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose probability reaches ``top_p`` (per row)."""
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1.0 - top_p.unsqueeze(1))
    remove[:, -1] = False  # always keep the most likely id
    mask = remove.scatter(1, sorted_ids, remove)
    return logits.masked_fill(mask, float("-inf"))

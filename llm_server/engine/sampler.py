"""Batched next-token selection with per-request settings, on the logits' device.

All rows of a step are processed together, as tensors, in this order (``model.generate``'s,
with OpenAI's penalties next to the repetition penalty):

1. ``logit_bias`` added to the raw logits (transformers' sequence bias for single ids);
2. ``repetition_penalty`` over the prompt and generated ids (divide positive logits, multiply
   negative ones);
3. ``presence_penalty`` / ``frequency_penalty`` over the generated ids only (OpenAI's
   definition: ``logit -= presence * [count > 0] + frequency * count``);
4. the grammar mask of constrained requests;
5. greedy rows take the argmax here; sampled rows go on: ``temperature``, ``top_k``, ``top_p``,
   ``min_p`` (each row its own values; 0 / 1.0 turn a filter off), then one draw.

The only host synchronisation is reading the chosen ids. A draw is an inverse-CDF draw with one
uniform number per row; each seeded request takes its number from its own ``torch.Generator``,
so its output does not depend on the other requests in the batch (the one per-row step: a
generator cannot fill another row's number). Rows that keep a top-k (the request's, or the
model's default) are filtered and drawn among their ``max k`` likeliest ids only, so the common
case never sorts the whole vocabulary. A row with ``top_p`` and no top-k is drawn among its
:data:`NUCLEUS_CANDIDATES` likeliest ids when their mass reaches ``top_p`` (then no other id can
be in the nucleus); only a row whose nucleus is wider (a flat distribution) sorts the vocabulary.
The choice is made per row, from that row alone.

Constrained requests (``params.constraint``) carry a grammar matcher: every accepted id advances
it; unconstrained rows of the same step are untouched. Requests with ``params.logprobs`` get each
chosen id's log-probability (and the likeliest alternatives) under the model's raw distribution
(before any of the steps above) recorded into their ``logprob_sink``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llm_server.engine.types import SamplingParams, TokenLogprob

if TYPE_CHECKING:  # the grammar library is an optional extra, needed only by constrained requests
    from llm_server.engine.constraints import GrammarMatcher


#: How many likeliest ids a top-p row without top-k is drawn among, when they hold its nucleus.
NUCLEUS_CANDIDATES = 1024


class SeenIds:
    """The ids a repetition penalty applies to (the prompt's and the generated ones), each once, in
    order, with their index tensor extended as ids arrive: the penalty reads and writes these
    logits alone, not the whole vocabulary."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.ids: list[int] = []
        self._known: set[int] = set()
        self._tensor = torch.empty(0, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, token_id: int) -> None:
        if 0 <= token_id < self.vocab_size and token_id not in self._known:
            self._known.add(token_id)
            self.ids.append(token_id)

    def tensor(self) -> torch.Tensor:
        """:attr:`ids` as int64 on the logits' device."""
        if self._tensor.numel() != len(self.ids):
            added = torch.tensor(self.ids[self._tensor.numel():], dtype=torch.long, device=self.device)
            self._tensor = torch.cat([self._tensor, added])
        return self._tensor


@dataclass
class SamplerState:
    """Per-request sampling state kept across steps."""

    params: SamplingParams
    generator: torch.Generator | None = None  # set for seeded requests
    seen: SeenIds | None = None  # prompt and generated ids (repetition penalty only)
    counts: torch.Tensor | None = None  # [vocab] float, generated ids (presence/frequency only)
    bias: torch.Tensor | None = None  # [vocab] float, the dense logit_bias
    matcher: GrammarMatcher | None = None  # constrained requests only

    @classmethod
    def create(
        cls, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device
    ) -> SamplerState:
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = SeenIds(vocab_size, device)
            for token_id in prompt_ids:
                seen.add(token_id)
        counts = None
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        matcher = params.constraint.matcher() if params.constraint is not None else None
        return cls(params=params, generator=generator, seen=seen, counts=counts,
                   bias=_dense_bias(params.logit_bias, vocab_size, device), matcher=matcher)

    def observe(self, token_id: int) -> None:
        """Record a generated id (for the penalties and the grammar)."""
        if self.seen is not None:
            self.seen.add(token_id)
        if self.counts is not None and 0 <= token_id < self.counts.numel():
            self.counts[token_id] += 1.0
        if self.matcher is not None:
            self.matcher.advance(token_id)


def _dense_bias(pairs: tuple[tuple[int, float], ...], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    if not pairs:
        return None
    bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    ids = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
    bias[ids] = torch.tensor([b for _, b in pairs], dtype=torch.float32, device=device)
    return bias


class Sampler:
    """Chooses one next id per row of a logits batch."""

    def __init__(self, device: torch.device, seed: int | None = None, top_k: int = 0) -> None:
        """``top_k`` (0: off) applies to sampled requests that set none, as ``model.generate`` does."""
        self._top_k = top_k
        self._generator = torch.Generator(device=device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def select(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> list[int]:
        """``logits``: [n, vocab] float32, row i belonging to ``states[i]``."""
        raw = logits
        logits = process_logits(logits, states)
        chosen = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampled_rows:
            chosen[sampled_rows] = self._sample(logits[sampled_rows], [states[i] for i in sampled_rows])
        ids = [int(t) for t in chosen.tolist()]
        _record_logprobs(raw, ids, states)
        return ids

    def warp(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        """Temperature, top-k, top-p and min-p applied to sampled rows' processed logits."""
        device = logits.device
        temperature = torch.tensor([s.params.temperature for s in states], dtype=logits.dtype, device=device)
        logits = logits / temperature.unsqueeze(1)
        vocab = logits.shape[-1]
        ks = [self._row_top_k(s.params, vocab) for s in states]
        if min(ks) < vocab:
            logits = _top_k_filter(logits, torch.tensor(ks, device=device), max(k for k in ks if k < vocab))
        top_p = [s.params.top_p for s in states]
        if min(top_p) < 1.0:
            logits = _top_p_filter(logits, torch.tensor(top_p, dtype=logits.dtype, device=device))
        min_p = [s.params.min_p for s in states]
        if max(min_p) > 0.0:
            logits = _min_p_filter(logits, torch.tensor(min_p, dtype=logits.dtype, device=device))
        return logits

    def _row_top_k(self, params: SamplingParams, vocab: int) -> int:
        k = self._top_k if params.top_k is None else params.top_k
        return vocab if k <= 0 or k >= vocab else k

    def _sample(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        """One draw per row. Rows that keep a top-k are filtered and drawn among their ``max k``
        likeliest ids only (no sort of the whole vocabulary); the others over the whole of it. On a
        tie at the k-th value such a row keeps exactly k ids (``torch.topk``'s pick among the tied),
        where :meth:`warp` keeps every tied id as transformers does; top-p then sees k candidates."""
        vocab = logits.shape[-1]
        ks = [self._row_top_k(s.params, vocab) for s in states]
        full = [i for i, k in enumerate(ks) if k >= vocab]
        if len(full) == len(states):
            return self._draw_full(logits, states)
        if not full:
            return self._draw_top_k(logits, states, ks)
        topk = [i for i, k in enumerate(ks) if k < vocab]
        chosen = torch.empty(len(states), dtype=torch.long, device=logits.device)
        chosen[full] = self._draw_full(logits[full], [states[i] for i in full])
        chosen[topk] = self._draw_top_k(logits[topk], [states[i] for i in topk], [ks[i] for i in topk])
        return chosen

    def _draw_full(self, logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        """Rows without top-k; a top-p row whose nucleus lies in its likeliest candidates skips the sort."""
        if logits.shape[-1] <= NUCLEUS_CANDIDATES or all(s.params.top_p >= 1.0 for s in states):
            return self._draw(torch.softmax(self.warp(logits, states), dim=-1), states)
        narrow, ids, warped = self._nucleus_candidates(logits, states)
        chosen = torch.empty(len(states), dtype=torch.long, device=logits.device)
        if rest := [i for i, n in enumerate(narrow) if not n]:
            picked = [states[i] for i in rest]
            chosen[rest] = self._draw(torch.softmax(self.warp(logits[rest], picked), dim=-1), picked)
        if rows := [i for i, n in enumerate(narrow) if n]:
            choice = self._draw(torch.softmax(warped[rows], dim=-1), [states[i] for i in rows])
            chosen[rows] = ids[rows].gather(1, choice.unsqueeze(1)).squeeze(1)
        return chosen

    def _nucleus_candidates(
        self, logits: torch.Tensor, states: Sequence[SamplerState]
    ) -> tuple[list[bool], torch.Tensor, torch.Tensor]:
        """Per row: whether its top-p nucleus lies within its :data:`NUCLEUS_CANDIDATES` likeliest
        ids; those ids; and their logits warped as :meth:`warp` would (valid for those rows)."""
        top_p = torch.tensor([s.params.top_p for s in states], dtype=logits.dtype, device=logits.device)
        temperature = torch.tensor([s.params.temperature for s in states], dtype=logits.dtype, device=logits.device)
        values, ids = torch.topk(logits, NUCLEUS_CANDIDATES, dim=-1)
        mass = torch.softmax(logits / temperature.unsqueeze(1), dim=-1).gather(1, ids).sum(dim=-1)
        narrow = ((top_p < 1.0) & (mass >= top_p)).tolist()
        # the candidates' softmax is renormalised to their mass: the nucleus limit scales with it
        limits = torch.where(top_p < 1.0, top_p / mass, top_p).clamp(max=1.0 - 1e-7).tolist()
        return narrow, ids, self._warp_candidates(values, states, [NUCLEUS_CANDIDATES] * len(states), limits)

    def _draw_top_k(self, logits: torch.Tensor, states: Sequence[SamplerState], ks: list[int]) -> torch.Tensor:
        values, ids = torch.topk(logits, max(ks), dim=-1)  # sorted, likeliest first
        choice = self._draw(torch.softmax(self._warp_candidates(values, states, ks), dim=-1), states)
        return ids.gather(1, choice.unsqueeze(1)).squeeze(1)

    def _draw(self, probs: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
        """Inverse-CDF draw: one uniform number per row (a seeded row's from its own generator)."""
        uniform = torch.empty(len(states), dtype=probs.dtype, device=probs.device)
        shared_rows = [i for i, s in enumerate(states) if s.generator is None]
        if shared_rows:
            uniform[shared_rows] = torch.rand(len(shared_rows), generator=self._generator, device=probs.device,
                                              dtype=probs.dtype)
        for i, state in enumerate(states):
            if state.generator is not None:
                uniform[i] = torch.rand(1, generator=state.generator, device=probs.device, dtype=probs.dtype)[0]
        cdf = probs.cumsum(dim=-1)
        target = (uniform * cdf[:, -1] * (1.0 - 1e-6)).unsqueeze(1)  # strictly inside the total mass
        chosen = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return chosen.clamp(max=probs.shape[-1] - 1)

    def _warp_candidates(
        self, values: torch.Tensor, states: Sequence[SamplerState], ks: list[int], top_p: list[float] | None = None
    ) -> torch.Tensor:
        """:meth:`warp` on each row's candidates (``values`` sorted descending, one column per id);
        ``top_p`` (default: the requests') is the nucleus limit within the candidates' own mass."""
        device = values.device
        temperature = torch.tensor([s.params.temperature for s in states], dtype=values.dtype, device=device)
        values = values / temperature.unsqueeze(1)
        position = torch.arange(values.shape[-1], device=device).unsqueeze(0)
        values = values.masked_fill(position >= torch.tensor(ks, device=device).unsqueeze(1), float("-inf"))
        top_p = top_p if top_p is not None else [s.params.top_p for s in states]
        if min(top_p) < 1.0:
            probs = torch.softmax(values, dim=-1)
            before = probs.cumsum(dim=-1) - probs  # the mass of the likelier candidates
            limit = torch.tensor(top_p, dtype=values.dtype, device=device).unsqueeze(1)
            remove = (before >= limit) & (limit < 1.0)
            remove[:, 0] = False
            values = values.masked_fill(remove, float("-inf"))
        min_p = [s.params.min_p for s in states]
        if max(min_p) > 0.0:
            values = _min_p_filter(values, torch.tensor(min_p, dtype=values.dtype, device=device))
        return values


def process_logits(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    """Steps 1-4 of the module docstring (a new tensor when any applies; ``logits`` is not changed)."""
    out = logits
    bias_rows = [i for i, s in enumerate(states) if s.bias is not None]
    if bias_rows:
        out = out.clone()
        out[bias_rows] += torch.stack([states[i].bias for i in bias_rows])  # type: ignore[misc]
    out = _apply_repetition_penalty(out, states)
    out = _apply_openai_penalties(out, states)
    return _apply_grammar(out, states)


def _apply_repetition_penalty(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    """Only the seen ids of each penalised row are read and written (a few hundred, not the
    vocabulary: at 16 rows of a 49152-id vocabulary 3.5 ms dense, a fraction of that sparse)."""
    seen = [(i, s.seen) for i, s in enumerate(states) if s.seen]
    if not seen:
        return logits
    vocab = logits.shape[-1]
    index = torch.cat([ids.tensor() + i * vocab for i, ids in seen])
    per_row = torch.tensor([states[i].params.repetition_penalty for i, _ in seen], dtype=logits.dtype,
                           device=logits.device)
    penalty = per_row.repeat_interleave(torch.tensor([len(ids) for _, ids in seen], device=logits.device))
    logits = logits.clone(memory_format=torch.contiguous_format)
    flat = logits.view(-1)
    values = flat[index]
    flat[index] = torch.where(values < 0, values * penalty, values / penalty)
    return logits


def _apply_openai_penalties(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    rows = [i for i, s in enumerate(states) if s.counts is not None]
    if not rows:
        return logits
    counts = torch.stack([states[i].counts for i in rows])  # type: ignore[misc]
    pairs = [(states[i].params.presence_penalty, states[i].params.frequency_penalty) for i in rows]
    penalties = torch.tensor(pairs, dtype=logits.dtype, device=logits.device)
    drop = penalties[:, :1] * (counts > 0).to(logits.dtype) + penalties[:, 1:] * counts
    logits = logits.clone()
    logits[rows] = logits[rows] - drop
    return logits


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


def _top_k_filter(logits: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Keep each row's ``k`` likeliest ids (``k >= vocab``: the row is untouched); ties kept."""
    values = torch.topk(logits, k_max, dim=-1).values
    kth = values.gather(1, (k.clamp(max=k_max) - 1).unsqueeze(1))
    kth = torch.where(k.unsqueeze(1) >= logits.shape[-1], torch.full_like(kth, float("-inf")), kth)
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose probability reaches ``top_p`` (per row)."""
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = (cumulative <= (1.0 - top_p.unsqueeze(1))) & (top_p < 1.0).unsqueeze(1)  # 1.0: row untouched
    remove[:, -1] = False  # always keep the most likely id
    mask = remove.scatter(1, sorted_ids, remove)
    return logits.masked_fill(mask, float("-inf"))


def _min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop ids whose probability is below ``min_p`` times the row's top probability (0: off)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))

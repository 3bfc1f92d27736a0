"""Speculative decoding from text already in the context: n-gram drafts, verified exactly.

A revision mostly repeats the answer it revises, a code edit mostly repeats the code, and OpenAI's
Predicted Outputs (``prediction``) say so outright. For such a request the engine guesses the next
few tokens by looking up the last tokens it generated in text it already has (prompt lookup, as
vLLM's ``ngram`` proposer and llama.cpp's lookup decoding do), and checks the guess with one forward:

- **Proposal** (:class:`Drafter`, one per request): the longest n-gram (``NGRAM_MAX`` down to 1)
  that ends the generated ids is looked up in the request's prediction (the occurrence at or after
  the point the last accepted draft reached, so a long prediction is followed in order), then (n >= 2)
  in its own output and its prompt; the ids that follow the match are the draft. Right after a
  mismatch, where the output's token is not in the prediction, the draft guesses that the output
  replaced the prediction's token and goes on after it (for up to ``MAX_SKIPS`` output tokens, then
  only n-gram matches). An index of every
  n-gram (:class:`NgramIndex`) makes each lookup a dict access. The draft length adapts: it doubles
  (up to ``speculative_tokens``) after a fully accepted draft and falls to what was accepted plus one
  after a refused one. After a draft refused whole the request rests: it drafts nothing for 1, then
  2, 4 ... up to ``MAX_REST`` steps while its drafts keep being refused whole, and drafts as usual
  again once one is accepted, even in part. A verify step costs more than a plain one (on a 2-core
  CPU a row of 1 + 7 tokens about twice a row of 1), so a prediction the output left (a sampled
  revision that rewrites instead of copying: 12-20 % of its draft tokens accepted) made the request
  slower than no speculation at all: 8.4 against 7.6 ms per decoded token, interleaved per prompt;
  with the rest, 7.4 against 7.4 (``benchmarks/revision_speculation.py``, 2026-12-07).
- **Grammar-forced ids**: for a constrained request the ids its grammar forces next
  (``GrammarMatcher.forced``: the keys and punctuation of a JSON schema, ``{"better": "`` of a
  verdict) are the draft whenever there are any, as SGLang's jump-forward decoding does. They are
  verified like any draft (the model may spell the same text with other ids), so the output is
  unchanged. A constrained request without a prediction drafts only these (unless prompt lookup is
  on), and they are counted apart (``Speculator.forced``), not as prediction tokens.
- **Verification** (:meth:`Speculator.step`): every decoding row runs in one forward, a drafting row
  as ``[last token, *draft]`` (the runner's ``forward(..., every=True)``: the logits of every new
  token). Then, position by position, each row's token is chosen by the engine's own selection (the
  sampler with the row's penalties, bias, grammar mask and seed, the state advanced by each applied
  token, exactly as in plain decoding) and applied (text, stop strings, EOS, ``max_new_tokens``). A
  row goes on to the next position only while the chosen token equals the draft's; the first
  mismatch's token is still the right one and is kept. So greedy output is the same with
  speculation on and off, and a sampled token is drawn from the same distribution (a draft is
  accepted with the probability the sampler gives it). A row never outruns its ``max_new_tokens``:
  drafts are cut to the room left.
- **Rollback**: right after the forward every row's cache length is set back to its last token, and
  grows by one for each accepted draft token; the positions of refused ones stay beyond the length,
  where the slot cache masks them and the next forward overwrites them (``ModelRunner.rollback``).
  The prefix cache saves only positions below the length, so never a refused one.

Rows batch with plain decode rows in the same forward (those run one token, padded). To bound the
padding, the drafts of a step are cut so that rows x (draft + 1) stays within
``STEP_TOKEN_BUDGET`` tokens: 8 draft tokens up to 3 rows, fewer beyond, none from 16 rows on
(a big batch already uses the cores; vLLM, too, turns speculation off at large batch sizes).
Where the runner has a fast path for steps of at most ``fast_tokens`` new tokens (``quantization:
auto``: 8, its int4 copy), a step of fewer rows keeps within it: one row drafts 7, not 8, so it is
not verified through the slower bf16 copy (a revision-like request in bf16 + auto: ~25 % less time
per character, 2026-12-07).
Runners that cannot roll back (``HFRunner``: the model's own cache) never speculate.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from llm_server.engine.runner import ModelRunner
from llm_server.engine.types import GenerationRequest

if TYPE_CHECKING:
    from llm_server.engine.sequence import Sequence as EngineSequence

NGRAM_MAX = 3  # the longest n-gram looked up
STEP_TOKEN_BUDGET = 32  # rows x (draft + 1) per speculative forward at most
MAX_SKIPS = 2  # after a mismatch, prediction tokens guessed replaced before waiting for an n-gram match
MAX_REST = 16  # the most steps a request drafts nothing after drafts refused whole

#: The engine's selection: one token per row (-1: that row's request failed and is finished).
Select = Callable[[list["EngineSequence"], torch.Tensor], list[int]]
#: The engine's application of one token to a row (text, stop strings, finishing).
Accept = Callable[["EngineSequence", int], None]


class NgramIndex:
    """A token list and, for every n-gram in it (n = 1..``NGRAM_MAX``), the positions that follow it."""

    def __init__(self, ids: Sequence[int] = ()) -> None:
        self.ids: list[int] = []
        self._after: dict[tuple[int, ...], list[int]] = {}
        self.extend(ids)

    def extend(self, ids: Sequence[int]) -> None:
        for token in ids:
            self.ids.append(token)
            end = len(self.ids)
            for n in range(1, min(NGRAM_MAX, end) + 1):
                self._after.setdefault(tuple(self.ids[end - n : end]), []).append(end)

    def follow(self, context: Sequence[int], k: int, n_min: int, cursor: int = 0,
               ahead: bool = False) -> tuple[list[int], int]:
        """Up to ``k`` ids that follow the longest n-gram (n >= ``n_min``) ending ``context``, taken
        from its first occurrence at or after ``cursor`` (else its last one; ``ahead``: else none),
        and where they start; ``([], -1)`` when no n-gram matches."""
        for n in range(min(NGRAM_MAX, len(context)), n_min - 1, -1):
            hits = self._after.get(tuple(context[len(context) - n :]))
            if not hits:
                continue
            usable = len(hits) - (hits[-1] >= len(self.ids))  # the end of the list has no continuation
            at = bisect.bisect_left(hits, cursor, 0, usable)
            if at < usable:
                return self.ids[hits[at] : hits[at] + k], hits[at]
            if usable and not ahead:
                return self.ids[hits[usable - 1] : hits[usable - 1] + k], hits[usable - 1]
        return [], -1


class Drafter:
    """One request's drafts: from its prediction, then its own output and its prompt; its counts."""

    def __init__(self, prompt_ids: Sequence[int], prediction: Sequence[int] | None, max_tokens: int,
                 ngrams: bool = True) -> None:
        self.ngrams = ngrams  # False: only a grammar's forced ids are drafted
        self.forcing = False  # the pending draft is the grammar's forced ids (not counted as prediction tokens)
        self.prediction = NgramIndex(prediction) if prediction else None
        self.prompt = NgramIndex(prompt_ids)
        self.output = NgramIndex()
        self.max_tokens = self.length = max_tokens
        self.cursor = 0  # the prediction's id that the next output token is expected to match
        self._guess = False  # the pending draft skipped ids of the prediction (no n-gram match)
        self._from_prediction = -1  # where the pending draft starts in the prediction (-1: elsewhere)
        self._skips = MAX_SKIPS  # prediction tokens skipped since the last n-gram match
        self._rest = 0  # steps left without n-gram drafts
        self._next_rest = 1  # the rest after the next draft refused whole
        self.accepted = self.rejected = 0

    def propose(self, generated: Sequence[int], limit: int, forced: Sequence[int] = ()) -> list[int]:
        """At most ``limit`` ids likely to follow ``generated`` (maybe none): the ids a grammar
        ``forced`` when there are any, else from the prediction, the output or the prompt."""
        self.output.extend(generated[len(self.output.ids) :])
        k = min(self.length, limit)
        self._from_prediction = -1
        self.forcing = bool(forced) and limit > 0
        if self.forcing:
            return list(forced[:limit])
        if k <= 0 or not self.ngrams:
            return []
        if self._rest > 0:
            self._rest -= 1
            return []
        if self.prediction is not None:
            draft, start = self._from_the_prediction(generated, k)
            if draft:
                self._from_prediction = start
                return draft
        for index in (self.output, self.prompt):
            draft, _ = index.follow(generated, k, 2)
            if draft:
                return draft
        return []

    def _from_the_prediction(self, generated: Sequence[int], k: int) -> tuple[list[int], int]:
        """A draft from the prediction: an n-gram match at or after the cursor; else, right after a
        mismatch, the ids after the cursor's (the output replaced it); else any n-gram match."""
        assert self.prediction is not None
        self._guess = False
        draft, start = self.prediction.follow(generated, k, 2, self.cursor, ahead=True)
        if draft:
            self._skips = 0
            return draft, start
        if self._skips < MAX_SKIPS:
            self._skips += 1
            self._guess = True
            return self.prediction.ids[self.cursor : self.cursor + k], self.cursor
        return self.prediction.follow(generated, k, 1, self.cursor)

    def adapt(self, drafted: int, accepted: int) -> None:
        """The outcome of the last proposal: adapt the draft length and the rest, move the prediction's cursor."""
        if self.forcing:  # says nothing about how well the n-grams guess
            return
        if self._from_prediction >= 0 and (accepted or self._guess):  # the output's next token is aligned
            self.cursor = self._from_prediction + accepted + 1  # with the prediction's id after this draft's
        if self._from_prediction >= 0 and 0 < accepted < drafted:  # a new mismatch: guess replaced ids
            self._skips = 0
        if accepted == drafted:
            self.length = min(self.max_tokens, 2 * self.length)
        else:
            self.length = max(1, accepted + 1)
        if accepted:
            self._next_rest = 1
        else:  # refused whole: rest, and rest longer after the next such draft
            self._rest, self._next_rest = self._next_rest, min(MAX_REST, 2 * self._next_rest)


class Speculator:
    """The engine's speculative decode step (see the module docstring)."""

    def __init__(self, max_tokens: int, lookup: bool, fast_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens
        self.lookup = lookup
        self.fast_tokens = fast_tokens  # the runner's (ModelRunner.fast_tokens)
        self.drafted = self.accepted = 0  # cumulative, for EngineStats
        self.forced = 0  # grammar-forced ids accepted (cumulative; not in drafted / accepted)

    def drafter(self, request: GenerationRequest) -> Drafter | None:
        """The request's drafter; None when it does not speculate."""
        ngrams = request.prediction is not None or self.lookup
        if self.max_tokens <= 0 or not (ngrams or request.params.constraint is not None):
            return None
        return Drafter(request.prompt_ids, request.prediction, self.max_tokens, ngrams)

    def drafts(self, batch: Sequence[EngineSequence]) -> list[list[int]] | None:
        """Each row's draft (empty for a row without); None when no row of the step drafts."""
        budget = STEP_TOKEN_BUDGET
        if self.fast_tokens is not None and len(batch) < self.fast_tokens:
            budget = min(budget, self.fast_tokens)  # a step that fits the fast path stays on it
        limit = min(self.max_tokens, budget // len(batch) - 1)
        if limit <= 0 or all(seq.drafter is None for seq in batch):
            return None
        drafts = []
        for seq in batch:
            room = seq.request.params.max_new_tokens - len(seq.generated) - 1  # never past max_new_tokens
            drafts.append(self._propose(seq, min(limit, room)))
        return drafts if any(drafts) else None

    @staticmethod
    def _propose(seq: EngineSequence, limit: int) -> list[int]:
        if seq.drafter is None:
            return []
        forced = seq.matcher.forced() if seq.matcher is not None and limit > 0 else []
        return seq.drafter.propose(seq.generated, limit, forced)

    def step(self, runner: ModelRunner, batch: list[EngineSequence], drafts: list[list[int]],
             select: Select, accept: Accept) -> None:
        """One forward for ``batch`` (drafts included), then the tokens chosen position by position."""
        handles = [seq.kv for seq in batch if seq.kv is not None]
        starts = [handle.length for handle in handles]
        rows = [[seq.generated[-1], *draft] for seq, draft in zip(batch, drafts, strict=True)]
        logits = runner.forward(handles, rows, every=True)
        offsets = [0]
        for draft in drafts:
            offsets.append(offsets[-1] + len(draft) + 1)
        for handle, start in zip(handles, starts, strict=True):
            runner.rollback(handle, start + 1)  # the last token only, for now
        for seq, draft in zip(batch, drafts, strict=True):  # counted refused until accepted, so a request
            if draft and seq.drafter is not None and not seq.drafter.forcing:  # that finishes inside the loop
                seq.drafter.rejected += len(draft)  # reports its counts
                self.drafted += len(draft)
        hits = [0] * len(batch)
        active = list(range(len(batch)))
        position = 0
        while active:
            tokens = select([batch[r] for r in active], logits[[offsets[r] + position for r in active]])
            still = []
            for r, token in zip(active, tokens, strict=True):
                if token < 0:  # its request failed
                    continue
                seq, draft = batch[r], drafts[r]
                hit = position < len(draft) and token == draft[position]
                if hit and seq.kv is not None:
                    hits[r] += 1
                    self._count_hit(seq)
                    seq.kv.length += 1  # the draft token's KV is right: keep it
                accept(seq, token)
                if hit and not seq.finished:
                    still.append(r)
            active, position = still, position + 1
        for seq, draft, count in zip(batch, drafts, hits, strict=True):
            if draft and seq.drafter is not None:
                seq.drafter.adapt(len(draft), count)

    def _count_hit(self, seq: EngineSequence) -> None:
        if seq.drafter.forcing:
            self.forced += 1
            return
        self.accepted += 1
        seq.drafter.accepted += 1
        seq.drafter.rejected -= 1


def draft_counts(seq: EngineSequence) -> tuple[int, int]:
    """(accepted, rejected) draft tokens of a finished request, for its ``Finished`` event."""
    drafter = seq.drafter
    return (drafter.accepted, drafter.rejected) if drafter is not None else (0, 0)


__all__ = ["MAX_REST", "STEP_TOKEN_BUDGET", "Drafter", "NgramIndex", "Speculator", "draft_counts"]

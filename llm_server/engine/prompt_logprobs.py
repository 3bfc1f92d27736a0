"""The log-probability of every prompt token (OpenAI's ``echo`` with ``logprobs``; lm-evaluation-harness
scores log-likelihoods with it).

A request with ``SamplingParams.prompt_logprobs`` gets, at admission on the scheduler thread, one
pass of its own over the whole prompt (:meth:`~llm_server.engine.runner.ModelRunner.prompt_logits`,
which leaves every running sequence's cache alone); its prefill then runs as any other (prefix
cache included). Position ``p``'s log-softmax gives the probability of prompt id ``p + 1``: the
model's raw distribution, as for generated tokens. The first id has no log-probability (None).
"""

from __future__ import annotations

import torch

from llm_server.engine.runner import ModelRunner
from llm_server.engine.types import GenerationRequest, TokenLogprob


def record_prompt_logprobs(runner: ModelRunner, request: GenerationRequest) -> None:
    """Record ``request``'s prompt log-probabilities into its sink (a no-op unless it asked for them)."""
    params = request.params
    sink = params.logprob_sink
    if not params.prompt_logprobs or sink is None:
        return
    sink.set_prompt(prompt_logprobs(runner, request.prompt_ids, params.logprobs or 0))


def prompt_logprobs(runner: ModelRunner, ids: list[int], top: int) -> list[TokenLogprob]:
    """Each id of ``ids`` with its log-probability given the ids before it and the ``top`` likeliest
    alternatives at its position (the first id: None, no alternatives)."""
    items = [TokenLogprob(ids[0], None)]
    if len(ids) < 2:
        return items
    logp = torch.log_softmax(runner.prompt_logits(ids)[:-1].float(), dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    k = min(top, logp.shape[-1])
    if k > 0:
        values, indices = logp.topk(k, dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen)
    items.extend(TokenLogprob(token, lp, alt) for token, lp, alt in zip(ids[1:], chosen, tops, strict=True))
    return items

"""PrefixCache on a real SlotCache, and the scheduler's admission with it (no model).

The KV written into a slot is a recognisable function of (position, token), so a restored prefix
can be checked position by position; the scheduler tests check the memory bound: reservations of
the running sequences plus cached tokens never exceed ``max_total_tokens``.
"""

from __future__ import annotations

import pytest
import torch

from llm_server.engine.config import EngineConfig
from llm_server.engine.detokenize import StopMatcher
from llm_server.engine.kv_cache import SlotCache
from llm_server.engine.prefix_cache import PrefixCache
from llm_server.engine.runner import KVHandle
from llm_server.engine.scheduler import Scheduler
from llm_server.engine.sequence import Sequence
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import GenerationRequest, SamplingParams

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 4


def slot_cache(slots: int = 4, context: int = 256) -> SlotCache:
    return SlotCache(LAYERS, KV_HEADS, HEAD_DIM, slots, context, torch.float32, torch.device("cpu"))


def filled(cache: SlotCache, ids: list[int]) -> KVHandle:
    """A handle whose slot holds KV = token id * 1000 + position for each of ``ids``."""
    handle = KVHandle()
    cache.take_slot(handle)
    cache.fit(len(ids))
    marks = torch.tensor([t * 1000 + p for p, t in enumerate(ids)], dtype=torch.float32)
    cache.keys[:, handle.slot, :, :, : len(ids)] = marks
    cache.values[:, handle.slot, :, : len(ids)] = marks.view(-1, 1)
    handle.length = len(ids)
    return handle


def marks_of(cache: SlotCache, handle: KVHandle) -> list[int]:
    keys, values = cache.read(handle.slot, 0, handle.length)
    assert torch.equal(keys[0, 0, 0], values[0, 0, :, 0])
    return [int(x) for x in keys[0, 0, 0]]


PROMPT = list(range(100, 150))  # 50 tokens: 3 full blocks of 16 fit before the last token


def test_a_saved_prefix_is_restored_exactly_up_to_the_token_before_the_last() -> None:
    cache, prefix = slot_cache(), PrefixCache(max_tokens=1024)
    source = filled(cache, PROMPT)
    assert prefix.save(cache, source, PROMPT, room=1024) == 48
    assert prefix.tokens == 48 and prefix.blocks == 3
    cache.release(source)
    # whole blocks, then (PROMPT[:48], [:16], [:5]) the next block in part, up to the last prompt token
    cases = ((PROMPT, 48), (PROMPT[:49], 48), (PROMPT[:48], 47), (PROMPT[:17], 16), (PROMPT[:16], 15), (PROMPT[:5], 4))
    for ids, expected in cases:
        handle = KVHandle()
        restored = prefix.restore(cache, handle, prefix.acquire(ids), len(ids))
        assert restored == expected == handle.length
        assert marks_of(cache, handle) == [t * 1000 + p for p, t in enumerate(ids[:expected])]
        cache.release(handle)
    assert prefix.queries == sum(len(ids) for ids, _ in cases) and prefix.hits == sum(n for _, n in cases)
    assert prefix.restore(cache, KVHandle(), prefix.acquire(PROMPT[:1]), 1) == 0  # the last token stays


def test_a_prompt_that_diverges_inside_a_block_reuses_the_blocks_before_it() -> None:
    cache, prefix = slot_cache(), PrefixCache(max_tokens=1024)
    prefix.save(cache, filled(cache, PROMPT), PROMPT, room=1024)
    diverging = PROMPT[:40] + [7, 8, 9, 10, 11]  # differs at position 40, inside the third block
    match = prefix.acquire(diverging)
    assert (len(match.blocks), match.tokens) == (3, 40)  # two whole blocks and 8 positions of the third
    handle = KVHandle()
    assert prefix.restore(cache, handle, match, len(diverging)) == 40
    assert marks_of(cache, handle) == [t * 1000 + p for p, t in enumerate(PROMPT[:40])]
    assert match.blocks == [] and prefix.evict(1024) == 48  # the copy dropped its references
    prefix.save(cache, filled(cache, PROMPT), PROMPT, room=1024)
    assert prefix.acquire([1] + PROMPT[1:]).tokens == 0  # differs at the first token: a miss
    same_tokens_elsewhere = PROMPT[16:32] + PROMPT[:16] + [5]  # a block's ids alone do not match
    assert prefix.acquire(same_tokens_elsewhere).tokens == 0


def test_a_prefix_shorter_than_a_block_is_shared_with_the_child_that_shares_most() -> None:
    cache, prefix = slot_cache(), PrefixCache(max_tokens=1024)
    system = list(range(500, 514))  # 14 tokens, as a short system prompt under a chat template
    for question in ([1, 2, 3, 4, 5], [6, 6, 6, 6, 6]):  # two prompts, one full block each
        ids = system + question
        prefix.save(cache, filled(cache, ids), ids, room=1024)
    asked = system + [1, 7, 7, 7, 7]
    match = prefix.acquire(asked)
    assert match.tokens == 15 and len(match.blocks) == 1  # the system prompt and "1": the first block's
    handle = KVHandle()
    prefix.restore(cache, handle, match, len(asked))
    assert marks_of(cache, handle) == [t * 1000 + p for p, t in enumerate(asked[:15])]
    assert prefix.acquire(system + [8]).tokens == 14


def test_save_keeps_only_new_blocks_and_only_what_the_handle_has_computed() -> None:
    cache, prefix = slot_cache(), PrefixCache(max_tokens=1024)
    handle = filled(cache, PROMPT[:20])
    assert prefix.save(cache, handle, PROMPT, room=1024) == 16  # 20 positions written: one full block
    longer = filled(cache, PROMPT)
    assert prefix.save(cache, longer, PROMPT, room=1024) == 32  # the first block was there already
    assert prefix.save(cache, longer, PROMPT, room=1024) == 0
    assert prefix.blocks == 3


def test_the_cache_stays_within_its_size_and_the_room_left_and_evicts_least_recently_used() -> None:
    cache, prefix = slot_cache(), PrefixCache(max_tokens=64)
    first, second = list(range(1000, 1050)), list(range(2000, 2050))
    prefix.save(cache, filled(cache, first), first, room=1024)
    prefix.save(cache, filled(cache, second), second, room=1024)
    assert prefix.tokens == 64  # 48 + 48 would exceed max_tokens: the oldest blocks gave way
    for ids, left in ((first, 1), (second, 3)):  # first's deepest blocks went first: its root is left
        held = prefix.acquire(ids)
        assert len(held.blocks) == left
        prefix.release(held)
    third = list(range(3000, 3050))
    assert prefix.save(cache, filled(cache, third), third, room=32) == 32  # room for 2 blocks in all
    assert prefix.tokens == 32
    assert prefix.save(cache, filled(cache, list(range(4000, 4050))), list(range(4000, 4050)), room=0) == 0


def test_eviction_takes_the_deepest_block_of_a_chain_first_and_spares_referenced_ones() -> None:
    cache, prefix = slot_cache(), PrefixCache(max_tokens=1024)
    prefix.save(cache, filled(cache, PROMPT), PROMPT, room=1024)
    assert prefix.evict(16) == 16
    held = prefix.acquire(PROMPT)
    assert len(held.blocks) == 2  # the root survives: the chain is shorter, not broken
    assert prefix.evict(1024) == 0  # both remaining blocks are referenced
    prefix.release(held)
    assert prefix.evict(1024) == 32 and prefix.blocks == 0


def sequence(rid: str, prompt: list[int], max_new_tokens: int) -> Sequence:
    request = GenerationRequest(rid, prompt, SamplingParams(max_new_tokens=max_new_tokens))
    return Sequence(request=request, stream=GenerationStream(rid), detok=None,  # type: ignore[arg-type]
                    stops=StopMatcher(()), reserved=len(prompt) + max_new_tokens)


def test_admission_evicts_cached_blocks_so_reservations_and_cache_stay_within_the_budget() -> None:
    budget = 400
    cache, prefix = slot_cache(), PrefixCache(max_tokens=budget)
    for base in (1000, 2000, 3000):
        ids = list(range(base, base + 100))
        prefix.save(cache, filled(cache, ids), ids, room=budget)
    assert prefix.tokens == 288
    scheduler = Scheduler(EngineConfig(max_total_tokens=budget, max_running=8), prefix)
    for i in range(4):
        scheduler.add(sequence(f"r{i}", list(range(3000, 3050)) if i == 0 else [5 + i] * 50, 50))
    admitted = scheduler.admit()
    # r0 holds its 4 matched blocks (49 tokens) until they are copied: 4 x 100 + 64 > 400, so r3 waits
    assert [s.prefix_match.tokens for s in admitted] == [49, 0, 0]
    assert scheduler.reserved_tokens() + prefix.tokens <= budget
    prefix.release(admitted[0].prefix_match)  # what the copy into r0's slot does
    assert [s.request_id for s in scheduler.admit()] == ["r3"]
    assert scheduler.reserved_tokens() == budget and prefix.tokens == 0


def test_a_request_alone_runs_even_when_its_own_matched_blocks_must_go() -> None:
    budget = 120
    cache, prefix = slot_cache(), PrefixCache(max_tokens=budget)
    ids = list(range(500, 600))
    prefix.save(cache, filled(cache, ids), ids, room=budget)
    scheduler = Scheduler(EngineConfig(max_total_tokens=budget), prefix)
    scheduler.add(sequence("alone", ids, 20))
    (seq,) = scheduler.admit()
    assert seq.prefix_match.tokens == 0 and prefix.tokens == 0


def test_admission_waits_while_referenced_blocks_leave_no_room() -> None:
    budget = 200
    cache, prefix = slot_cache(), PrefixCache(max_tokens=budget)
    ids = list(range(500, 600))
    prefix.save(cache, filled(cache, ids), ids, room=budget)  # 96 tokens
    scheduler = Scheduler(EngineConfig(max_total_tokens=budget), prefix)
    scheduler.add(sequence("sharer", ids[:60], 10))
    scheduler.add(sequence("other", [5] * 80, 10))
    first = scheduler.admit()
    # the sharer holds 4 blocks (59 tokens) until its copy; 2 x 90 + 64 > 200 -> the other waits
    assert [s.request_id for s in first] == ["sharer"] and first[0].prefix_match.tokens == 59
    assert scheduler.reserved_tokens() + prefix.tokens <= budget
    prefix.release(first[0].prefix_match)
    assert [s.request_id for s in scheduler.admit()] == ["other"]
    assert scheduler.reserved_tokens() + prefix.tokens <= budget


def test_admission_gives_up_a_block_shared_in_part_rather_than_wait_for_room_to_reuse_it() -> None:
    budget = 200
    cache, prefix = slot_cache(), PrefixCache(max_tokens=budget)
    cached = [1, *range(500, 515)]  # one block; the new prompt shares only its first id
    prefix.save(cache, filled(cache, cached), cached, room=budget)
    scheduler = Scheduler(EngineConfig(max_total_tokens=budget), prefix)
    scheduler.add(sequence("running", [9] * 50, 50))  # reserves 100
    (running,) = scheduler.admit()
    prefix.release(running.prefix_match)
    scheduler.add(sequence("new", [1] + [7] * 49, 50))  # 2 x 100 + 16 cached > 200
    (new,) = scheduler.admit()  # at once, from scratch: its one shared token was not worth the wait
    assert new.prefix_match.tokens == 0 and prefix.tokens == 0
    assert scheduler.reserved_tokens() + prefix.tokens <= budget


def test_a_request_waits_for_a_prefilling_one_that_shares_most_of_its_prompt_but_not_for_a_short_header() -> None:
    prefix = PrefixCache(max_tokens=1000)
    scheduler = Scheduler(EngineConfig(max_total_tokens=1000), prefix)
    system = list(range(700, 764))  # 4 blocks
    scheduler.add(sequence("first", system + [1, 2, 3], 10))
    scheduler.add(sequence("second", system + [4, 5, 6, 7], 10))
    scheduler.add(sequence("third", system[:16] + list(range(900, 960)), 10))  # shares one block of 76 tokens
    assert [s.request_id for s in scheduler.admit()] == ["first"]
    first = scheduler.prefilling[0]
    assert scheduler.prefilled(first, first.prompt_len)  # now decoding
    cache = slot_cache()
    prefix.save(cache, filled(cache, first.request.prompt_ids), first.request.prompt_ids, room=1000)
    admitted = scheduler.admit()
    assert [(s.request_id, s.prefix_match.tokens) for s in admitted] == [("second", 64), ("third", 16)]
    for seq in admitted:
        prefix.release(seq.prefix_match)
    header = Scheduler(EngineConfig(max_total_tokens=1000), PrefixCache(max_tokens=1000))
    header.add(sequence("first", system + [1, 2, 3], 10))
    header.add(sequence("third", system[:16] + list(range(900, 960)), 10))
    assert [s.request_id for s in header.admit()] == ["first", "third"]  # one shared block: no wait


def test_a_block_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        PrefixCache(max_tokens=10, block_size=0)

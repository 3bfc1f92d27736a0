"""The compact Llama runner against the HF forward: logits of a sequence do not depend on its
batch neighbours, on slot moves when others leave, on chunked prefill or on cache growth."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm_server.engine.llama_runner import LlamaRunner, unsupported_reason
from llm_server.engine.runner import KVHandle
from tests.test_engine_batching import build_model


def hf_last_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize(("kind", "pack", "fused"),
                         [("llama", True, True), ("qwen2", True, True), ("llama", False, True), ("llama", True, False)])
def test_runner_logits_match_the_hf_forward_through_moves_chunks_and_growth(kind: str, pack: bool, fused: bool) -> None:
    """``fused``: small steps in the fused CPU kernels (engine/cpu_kernels.py) or in PyTorch ops."""
    model = build_model(512, kind)
    assert unsupported_reason(model) is None
    runner = LlamaRunner(model, max_slots=4, max_context=1024, pack_weights=pack, fused_kernels=fused)
    assert (runner._kernels is not None) == fused
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (length,), generator=generator).tolist() for length in (5, 17, 9, 300)]
    history: dict[int, list[int]] = {}
    handles: dict[int, KVHandle] = {}

    def step(batch: dict[int, list[int]]) -> None:
        for i in batch:
            handles.setdefault(i, runner.open())
            history.setdefault(i, [])
            history[i] += batch[i]
        with torch.inference_mode():
            logits = runner.forward([handles[i] for i in batch], list(batch.values()))
        for row, i in enumerate(batch):
            torch.testing.assert_close(logits[row], hf_last_logits(model, history[i]), atol=2e-4, rtol=1e-4)

    step({0: prompts[0], 1: prompts[1]})  # prefill two together (padded)
    step({2: prompts[2], 3: prompts[3][:100]})  # a third, and a long prompt's first chunk
    step({0: [7], 1: [8], 2: [9]})  # decode three while the long prompt waits
    runner.release(handles.pop(1))  # one leaves: the others are moved to contiguous slots
    history.pop(1)
    step({2: [10], 0: [11]})  # any order
    step({3: prompts[3][100:]})  # the rest of the long prompt: the cache grows past 256
    step({4: prompts[1][:6]})  # a newcomer reuses the freed slot
    for token in range(12, 16):
        step({0: [token], 2: [token + 1], 3: [token + 2], 4: [token + 3]})
    runner.release(handles.pop(0))
    history.pop(0)
    step({3: [20], 4: [21], 2: [22]})
    slots = sorted(h.slot for h in handles.values())
    assert slots == list(range(slots[0], slots[0] + 3))  # the batch reads one contiguous cache view
    middle = next(i for i, h in handles.items() if h.slot == slots[1])
    outer = [i for i in handles if i != middle]
    step({outer[0]: [30], outer[1]: [31]})  # the sequence in between is swapped out of the way
    assert handles[middle].slot in (slots[0], slots[2])
    step({middle: [32]})
    step({i: [33] for i in handles})


def test_weights_are_shared_with_the_hf_model() -> None:
    model = build_model(512, "llama")
    before = hf_last_logits(model, [5, 6, 7])
    LlamaRunner(model, max_slots=2, max_context=64)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4
    torch.testing.assert_close(hf_last_logits(model, [5, 6, 7]), before, atol=0, rtol=0)


def test_the_kv_cache_holds_only_the_slots_and_positions_in_use() -> None:
    """A 64-slot runner serving a few sequences allocates rows for the slots in use and positions for
    the longest sequence (not 64 x capacity), grows in few re-allocations while decoding, keeps every
    sequence's cache through growth and shrinking, and frees it all when idle."""
    model = build_model(512, "llama")
    runner = LlamaRunner(model, max_slots=64, max_context=1024)
    slot_position_bytes = 2 * 2 * 16 * 2 * 4  # layers x kv_heads x head_dim x (K, V) x float32
    generator = torch.Generator().manual_seed(1)
    history = [torch.randint(3, 512, (12,), generator=generator).tolist() for _ in range(16)]
    history[0] = torch.randint(3, 512, (300,), generator=generator).tolist()
    handles = [runner.open() for _ in history]

    def step(rows: list[int], tokens: list[list[int]], check: bool = True) -> None:
        for i, ids in zip(rows, tokens, strict=True):
            history[i] = history[i] + ids if handles[i].length else ids
        with torch.inference_mode():
            logits = runner.forward([handles[i] for i in rows], tokens)
        if check:
            for row, i in enumerate(rows):
                torch.testing.assert_close(logits[row], hf_last_logits(model, history[i]), atol=2e-4, rtol=1e-4)

    step([0], [history[0]])
    slots, positions = runner.cache_shape
    assert slots == 1 and 300 < positions <= 300 + 64
    assert runner.cache_bytes == slots * positions * slot_position_bytes
    step(list(range(1, 16)), history[1:16])
    assert runner.cache_shape == (16, positions)  # rows follow the slots in use

    shapes = {runner.cache_shape}
    for token in range(500):  # the long sequence decodes on to 800 tokens
        step([0], [[3 + token]], check=token % 100 == 99)
        shapes.add(runner.cache_shape)
    slots, positions = runner.cache_shape
    assert 800 <= positions <= 800 * 1.25 + 64  # little masked padding for attention to read
    assert len(shapes) <= 11  # growth is amortised (a re-allocation every 32 tokens would be 16)

    for i in range(3, 16):  # the slots in use fall to a quarter: the rows shrink, contents kept
        runner.release(handles[i])
    step([0, 1, 2], [[7], [8], [9]])
    assert runner.cache_shape[0] == 4
    runner.release(handles[0])  # the long one leaves: the capacity follows the longest left
    step([1, 2], [[10], [11]])
    assert runner.cache_shape[1] <= 64
    for handle in handles:
        runner.release(handle)
    runner.idle()
    assert runner.cache_bytes == 0
    handles[0] = runner.open()
    step([0], [history[5][:9]])  # a newcomer after idle: a fresh small cache
    assert runner.cache_shape[0] == 1


def test_freed_heap_goes_back_to_the_os_on_shrink_idle_and_steady_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache hands freed heap pages back (malloc_trim) when it shrinks, when it is freed, and
    every TRIM_INTERVAL_S under steady load, not on every step."""
    from llm_server.engine import kv_cache

    trims: list[float] = []
    now = [1000.0]
    monkeypatch.setattr(kv_cache, "_trim_heap", lambda: trims.append(now[0]))
    monkeypatch.setattr(kv_cache, "_clock", lambda: now[0])
    cache = kv_cache.SlotCache(2, 2, 8, max_slots=8, max_context=512, dtype=torch.float32, device=torch.device("cpu"))
    handles = [KVHandle() for _ in range(4)]
    for handle in handles:
        cache.take_slot(handle)
    cache.fit(40)
    steady = len(trims)
    for _ in range(50):  # steady load, 0.1 s per step: 5 s, below the interval
        now[0] += 0.1
        cache.fit(40)
    assert len(trims) == steady
    now[0] += kv_cache.TRIM_INTERVAL_S
    cache.fit(40)
    assert len(trims) == steady + 1
    for handle in handles[1:]:
        cache.release(handle)
    cache.fit(40)  # the rows in use fall to a quarter: shrink, trim
    assert cache.rows == 1 and len(trims) == steady + 2
    cache.release(handles[0])
    cache.idle()
    assert cache.nbytes == 0 and len(trims) == steady + 3

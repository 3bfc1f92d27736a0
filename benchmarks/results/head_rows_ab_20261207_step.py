"""Probe kept with its results (head_rows_ab_20261207.md): one decode step of the embedded model with the LM head's int8 copy for <= 8, 2 or 1 rows. Run from the repo root with PYTHONPATH=$PWD."""
import statistics, time
from llm_server.helper_functionality.model_loading import initialize
from llm_server.engine import quant
from llm_server.engine.llama_runner import LlamaRunner
from benchmarks.weight_bench import _prompt_ids
import torch
tok, model = initialize(device="cpu", dtype="bfloat16", compile=False, quantization="none")
prompt = _prompt_ids(tok)
batches = [1, 2, 3, 4, 6, 8]
def runner(b, head_rows):
    r = LlamaRunner(model, max_slots=b, max_context=1024, quantization="auto")
    if head_rows is not None:
        r._lm_head.max_small_rows = head_rows
    return r
variants = {"head int8<=8 (today)": None, "head int8<=2": 2, "head int8<=1": 1}
r0 = LlamaRunner(model, max_slots=1, max_context=1024, quantization="auto")
print([n for n in vars(r0) if "head" in n])
runners = {(v, b): runner(b, h) for v, h in variants.items() for b in batches}
with torch.inference_mode():
    handles = {}
    for key, r in runners.items():
        handles[key] = [r.open() for _ in range(key[1])]
        r.forward(handles[key], [prompt] * key[1])
        for _ in range(3): r.forward(handles[key], [[5]] * key[1])
    samples = {k: [] for k in runners}
    for rnd in range(5):
        for key, r in runners.items():
            h = handles[key]
            t = time.perf_counter()
            for _ in range(8): r.forward(h, [[5]] * key[1])
            samples[key].append((time.perf_counter() - t) / 8 * 1e3)
    for b in batches:
        print(b, "  ".join(f"{v}: {statistics.median(samples[(v, b)]):.2f} (min {min(samples[(v, b)]):.2f})" for v in variants), flush=True)

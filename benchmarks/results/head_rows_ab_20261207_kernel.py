"""Probe kept with its results (head_rows_ab_20261207.md): one LM-head call, oneDNN-packed bf16 vs _weight_int8pack_mm."""
import torch, time
torch.set_num_threads(2)
def bench(f, n=20):
    for _ in range(3): f()
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e3
for N, K in ((49152, 576), (128256, 2048)):
    w = (torch.randn(N, K) * 0.05).bfloat16()
    pw = torch.ops.mkldnn._reorder_linear_weight(w, None)
    s = w.float().abs().amax(1) / 127; wq = torch.round(w.float() / s[:, None]).to(torch.int8); sb = s.bfloat16()
    for M in (1, 2, 3, 4):
        x = torch.randn(M, K).bfloat16()
        t1 = bench(lambda: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], ""))
        t2 = bench(lambda: torch.ops.aten._weight_int8pack_mm(x, wq, sb))
        print(f"head {N}x{K} M={M}: packed bf16 {t1:.3f} ms, int8pack {t2:.3f} ms")
    del w, pw, wq

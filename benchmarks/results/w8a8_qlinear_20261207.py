import torch, time
torch.set_num_threads(2)
def bench(f, n=20):
    for _ in range(3): f()
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e3
ops = torch.ops.onednn
print([n for n in dir(ops) if "qlinear" in n])
for M in (64, 256, 720):
  for (K, N) in ((576, 1536), (576, 3072), (1536, 576)):
    w = torch.randn(N, K) * 0.05
    x = torch.randn(M, K).bfloat16()
    pw = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), None)
    tb = bench(lambda: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], ""))
    ws = (w.abs().amax(1) / 127.0).float()
    qw = torch.round(w / ws[:, None]).to(torch.int8)
    wzp = torch.zeros(N, dtype=torch.int64)
    packed = ops.qlinear_prepack(qw, [M, K])
    def q():
        xf = x.float()
        s = float(xf.abs().max()) / 127.0
        qx = torch.round(xf / s).clamp_(-128, 127).add_(128).to(torch.uint8) if False else torch.clamp(torch.round(xf / s) + 128, 0, 255).to(torch.uint8)
        return ops.qlinear_pointwise(qx, s, 128, packed, ws, wzp, None, 1.0, 0, torch.bfloat16, "none", [], "")
    try:
        tq = bench(q)
        ref = torch.nn.functional.linear(x.float(), w)
        err = ((q().float() - ref).norm() / ref.norm()).item()
    except Exception as e:
        tq = float('nan'); err = float('nan'); print("ERR", str(e)[:300])
    print(f"M={M} {K}->{N}: bf16 {tb:.3f} qlinear(dyn per-tensor) {tq:.3f} ratio {tb/tq:.2f} err {err:.4f}")

import sys, os, asyncio, tempfile, shutil, dataclasses, time
from pathlib import Path
sys.path.insert(0, 'benchmarks'); sys.path.insert(0, '.')
import bench_models as bm
from servebench import peers
from servebench.client import drive
from servebench.servers import REPO_ROOT, free_port, running
work = Path(tempfile.mkdtemp(prefix="gil_ab."))
families = sys.argv[1].split(",")
settings = sys.argv[2].split(",")  # e.g. default,0.001
folders = bm.export_folders(families, work, "float32")
def ours(folder, switch):
    port = free_port()
    cfg = work / f"config{port}"
    peers.write_our_config(cfg, str(folder), "float32", port, 16, 32, [])
    spec = peers.ours_spec(cfg, port)
    env = {**spec.env, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), spec.env.get("PYTHONPATH", "")) if p)}
    if switch == "omp1":
        env["OMP_NUM_THREADS"] = "1"
    elif switch != "default":
        env["LLM_SERVER_EXP_SWITCH"] = switch
    else:
        env.pop("LLM_SERVER_EXP_SWITCH", None)
    spec = dataclasses.replace(spec, env=env)
    with running(spec, work) as server:
        rows = asyncio.run(drive(spec, server.proc.pid, [16], [160], 32, 64.0, 0))
    return {r.concurrency: round(r.tokens_per_s, 1) for r in rows}
for rnd in range(3):
    for fam in families:
        for sw in (settings if rnd % 2 == 0 else settings[::-1]):
            print(time.strftime("%H:%M:%S"), fam, sw, ours(folders[fam], sw), flush=True)
shutil.rmtree(work, ignore_errors=True)

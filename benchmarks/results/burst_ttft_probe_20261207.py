import sys, time, subprocess, os, tempfile, asyncio, yaml
from pathlib import Path
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks")
from servebench.client import messages_for
import requests
from openai import AsyncOpenAI
from llm_server.helper_functionality.yaml_loading import PACKAGE_CONFIG_DIR
from llm_server.helper_functionality import model_loading as m
config = yaml.safe_load((Path(PACKAGE_CONFIG_DIR) / "model_config.yaml").read_text())
config["model"]["id"] = str(m.export_embedded_model())
config["model"].setdefault("parameters", {}).update(repetition_penalty=1.0, top_p=1.0)
folder = Path(tempfile.mkdtemp()); (folder / "model_config.yaml").write_text(yaml.safe_dump(config))
log = open("/tmp/probe/ttft_server.log", "w")
p = subprocess.Popen([sys.executable, "-m", "llm_server.api.server", "--port", "8133", "--open-access", "--config-dir", str(folder), "--log-level", sys.argv[1] if len(sys.argv) > 1 else "info"], stdout=log, stderr=log)
url = "http://127.0.0.1:8133"
for _ in range(300):
    try:
        if requests.get(url + "/health", timeout=2).status_code == 200: break
    except Exception: pass
    time.sleep(1)
client = AsyncOpenAI(base_url=url + "/v1", api_key="x")
async def one(i, t0):
    sent = time.perf_counter()
    stream = await client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages_for(i), max_tokens=64, temperature=0, stream=True, stream_options={"include_usage": True})
    first = None; cached = None
    async for c in stream:
        if first is None and c.choices and c.choices[0].delta.content:
            first = time.perf_counter()
        if c.usage is not None and c.usage.prompt_tokens_details: cached = c.usage.prompt_tokens_details.cached_tokens
    return i, round((sent - t0) * 1000), round((first - sent) * 1000), cached
async def level(n):
    t0 = time.perf_counter()
    return await asyncio.gather(*(one(i, t0) for i in range(n)))
async def main():
    await level(16)  # warm
    for rep in range(3):
        res = await level(16)
        ttfts = sorted(r[2] for r in res)
        print("burst", rep, "TTFT ms sorted", ttfts, "cached", [r[3] for r in res][:4], flush=True)
asyncio.run(main())
p.terminate(); p.wait()

import sys, time, statistics; sys.path.insert(0, '.')
from llm_server.helper_functionality.model_loading import initialize
from llm_server.conversation_engine import outputs, prompt_reuse
from llm_server.helper_functionality.yaml_loading import load_system_prompt
tok, model = initialize(device="cpu", model_id="embedded:SmolLM2-135M-Instruct", dtype="float32", compile=False, quantization="none")
prompts = load_system_prompt()
times = {10**9: [], 16: []}
for rep in range(3):
    for min_shared in ((10**9, 16) if rep % 2 == 0 else (16, 10**9)):
        prompt_reuse.MIN_SHARED_TOKENS = min_shared
        t = time.perf_counter()
        for q in ["Explain how TCP works.", "What is the capital of Egypt?", "Which planet is closest to the Sun?"]:
            "".join(outputs.stream_and_improve_reply(tok, model, prompts, q, "assistant", [], {}, max_new_tokens=48, do_sample=False))
        times[min_shared].append(time.perf_counter() - t)
print("off", [round(x, 2) for x in times[10**9]], "on", [round(x, 2) for x in times[16]])

"""Speculative decoding on the embedded model: a revision-like request (the prompt holds a ~200-token
answer, the prediction is that answer, greedy) with speculation on and off, in one process.

    python benchmarks/speculative_bench.py [--tokens 200] [--rounds 2]

Prints tok/s for each and the acceptance counts; the texts must be equal.
"""

from __future__ import annotations

import argparse
import time

from llm_server.conversation_engine.inputs import chat_token_ids
from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.types import GenerationRequest, SamplingParams
from llm_server.helper_functionality.model_loading import embedded_gguf_path, initialize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    tokenizer, model = initialize(device="cpu", model_id=str(embedded_gguf_path()), dtype=args.dtype, compile=False)
    params = SamplingParams(max_new_tokens=args.tokens, do_sample=False)
    engine = BatchEngine(tokenizer, model, "embedded", EngineConfig(speculative_tokens=8, prefix_caching=False))
    engine.start()
    question = [{"role": "user", "content": "Explain how REST APIs work."}]
    draft = engine.submit(GenerationRequest("draft", chat_token_ids(tokenizer, question), params)).result().text
    messages = [{"role": "user", "content": "Improve this answer to 'Explain how REST APIs work.' Write the "
                 f"complete improved answer.\n\nAnswer:\n{draft}"}]
    prompt = chat_token_ids(tokenizer, messages)
    first = engine.submit(GenerationRequest("r0", prompt, params)).result()  # the revision, greedy
    prediction = tuple(tokenizer(first.text, add_special_tokens=False)["input_ids"])
    for round_ in range(args.rounds):
        for label, pred in (("off", None), ("on", prediction), ("on, draft as prediction",
                            tuple(tokenizer(draft, add_special_tokens=False)["input_ids"]))):
            started = time.perf_counter()
            done = engine.submit(GenerationRequest(f"{label}{round_}", prompt, params, pred)).result()
            seconds = time.perf_counter() - started
            same = "same" if done.text == first.text else "DIFFERENT"
            print(f"round {round_} speculation {label:24s} {done.completion_tokens} tokens {seconds:6.2f} s "
                  f"{done.completion_tokens / seconds:6.1f} tok/s accepted {done.accepted_prediction_tokens} "
                  f"rejected {done.rejected_prediction_tokens} text {same}", flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()

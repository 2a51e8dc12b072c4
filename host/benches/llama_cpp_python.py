"""The llama-cpp-python baseline of the platform benchmark (pip install llama-cpp-python==0.3.36).

python3 llama_cpp_python.py MODEL PROMPT NEW_TOKENS THREADS: greedy generation, best of 3;
prints JSON {"tokens_per_sec", "first_token_ms", "version"} (decode rate after the first token).
"""
import json
import sys
import time

import llama_cpp

model_path, prompt, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=model_path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
best_rate, best_first = 0.0, float("inf")
for _ in range(3):
    llm.reset()
    started = time.perf_counter()
    first, generated = None, 0
    for _chunk in llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, top_k=1, stream=True):
        generated += 1
        if first is None:
            first = time.perf_counter() - started
    rate = (generated - 1) / (time.perf_counter() - started - first)
    best_rate, best_first = max(best_rate, rate), min(best_first, first)
print(json.dumps({"tokens_per_sec": best_rate, "first_token_ms": best_first * 1e3, "version": llama_cpp.__version__}))

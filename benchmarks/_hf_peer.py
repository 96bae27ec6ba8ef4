"""transformers side of benchmarks/peers.py: one batched `generate` over every prompt.

    python benchmarks/_hf_peer.py SPEC.json

SPEC.json: {"checkpoint", "dtype" ("fp32"|"bf16"), "prompts" (lists of token ids, all the same
length, so no padding), "max_tokens", "warmup" (bool: a 2-token generate of the same batch first),
"repeat" (timed runs, default 1), "threads" (torch intra-op threads, default torch's)}.
Greedy, min_new_tokens = max_new_tokens (EOS never ends a row early), KV cache on (transformers'
default DynamicCache). TTFT is the batch's: from the generate call to the first time the logits
processor runs, i.e. after the prefill forward, which every request shares.

Prints, last on stdout, one line `PEER_RESULT {json}`.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype).eval()
    load_s = time.perf_counter() - t_load
    ids = torch.tensor(spec["prompts"], dtype=torch.long)
    mask = torch.ones_like(ids)
    n_new = int(spec["max_tokens"])

    class FirstCall(LogitsProcessor):
        def __init__(self) -> None:
            self.t: float | None = None

        def __call__(self, input_ids, scores):
            if self.t is None:
                self.t = time.perf_counter()
            return scores

    def generate(n: int, first: FirstCall | None = None):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, num_beams=1, use_cache=True, pad_token_id=0,
                              logits_processor=LogitsProcessorList([first] if first else []))

    runs, new = [], None
    with torch.inference_mode():
        if spec.get("warmup", True):
            generate(2)
        for _ in range(max(1, int(spec.get("repeat", 1)))):
            first = FirstCall()
            t0 = time.perf_counter()
            out = generate(n_new, first)
            wall = time.perf_counter() - t0
            new = out[:, ids.shape[1]:]
            runs.append({"duration_s": wall, "output_tokens": int(new.numel()),
                         "output_tokens_per_s": new.numel() / wall,
                         "ttft_p50_s": (first.t - t0) if first.t is not None else None})
    result = {
        "peer": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "load_s": load_s, "runs": runs,
        "num_requests": int(ids.shape[0]), "tokens_per_request": [int(new.shape[1])] * 2,
        "first_tokens": new[:4, :8].tolist(),
    }
    print("PEER_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

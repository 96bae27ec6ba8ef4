"""Multi-turn conversations over two engine replicas: prefix-affinity routing against power of two.

    .venv/bin/python benchmarks/prefix_routing.py [--rounds 2] [--conversations 24] [--turns 4]

On a local cluster (`moe-serve up`, the shipped Serve config, --nodes nodes, --expert-shards shards,
the EngineReplica deployment held at --replicas replicas, each shard at one) --conversations chat sessions run, at most
--concurrency of them at a time, each --turns turns: a shared --system-len-token system prompt and
the session's first --user-len user tokens, then each turn the previous prompt + the answer
(--max-tokens greedy tokens) + --user-len new tokens, after a pause of --think-s seconds on average
(exponential; without it a conversation's next turn finds the replica it just left the least
loaded, which routing by load alone then picks anyway). The same seeded sessions run twice per round
on fresh clusters: with the shipped router (serving.routing.ray_router:PrefixAffinityRouter) and
with Serve's default (power of two choices). Prints the command, the machine, and per run: the
prefix-cache hit rate (hit / prompt tokens, from the replicas' counters on the metrics endpoint),
TTFT p50 / p90 of the follow-up turns, wall time, and the ratios of the two in the same round.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from _cluster import DEMO_CHECKPOINT, ensure_checkpoint, local_cluster, print_header
from serving.client import MoEClient, build_request
from serving.launcher import DEFAULT_CONFIG


def _config(path: Path, a: argparse.Namespace, affinity: bool) -> Path:
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app = cfg["applications"][0]
    model_len = a.system_len + a.turns * (a.user_len + a.max_tokens) + 1
    app["args"].update(max_model_len=max(model_len, app["args"]["max_model_len"]),
                       max_tokens_limit=max(a.max_tokens, 2))
    for d in app["deployments"]:
        if d["name"] == "EngineReplica":
            d["autoscaling_config"].update(min_replicas=a.replicas, initial_replicas=a.replicas,
                                           max_replicas=a.replicas)
            if not affinity:
                d.pop("request_router_config", None)          # Serve's default router
        elif d.get("autoscaling_config"):                     # the shards held at one replica: less noise
            d["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=1)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _counters(url: str) -> dict[str, dict[str, float]]:
    """Per replica: prefix-cache hit tokens and prompt tokens so far."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {"hit": {}, "prompt": {}}
    for line in text.splitlines():
        for key, family in (("hit", "moe_serve_prefix_cache_hit_tokens_total{"),
                            ("prompt", "moe_serve_prompt_tokens_total{")):
            if line.startswith(family):
                replica = line.split('replica="')[1].split('"')[0]
                out[key][replica] = out[key].get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _growth(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {r: n - before.get(r, 0.0) for r, n in after.items() if n - before.get(r, 0.0) > 0}


def _sessions(a: argparse.Namespace, vocab: int) -> list[tuple[list[int], list[list[int]]]]:
    """(first prompt, the user tokens of each later turn) per conversation; one shared system prompt."""
    rng = random.Random(a.seed)
    system = [rng.randrange(3, vocab) for _ in range(a.system_len)]
    return [(system + [rng.randrange(3, vocab) for _ in range(a.user_len)],
             [[rng.randrange(3, vocab) for _ in range(a.user_len)] for _ in range(a.turns - 1)])
            for _ in range(a.conversations)]


def _converse(target: str, first: list[int], later: list[list[int]], max_tokens: int, think_s: float,
              seed: int, ttfts: list[tuple[int, float]], lock: threading.Lock) -> None:
    prompt, rng = list(first), random.Random(seed)
    with MoEClient(target, timeout_s=300) as c:
        for turn in range(len(later) + 1):
            if turn:                              # the user reads the answer and types the next message
                time.sleep(rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0)
            t0, ttft, answer = time.monotonic(), None, []
            for chunk in c.generate(build_request(prompt_ids=prompt, max_tokens=max_tokens, temperature=0,
                                                  ignore_eos=True)):
                if ttft is None and chunk.token_ids:
                    ttft = time.monotonic() - t0
                answer.extend(chunk.token_ids)
            with lock:
                ttfts.append((turn, ttft))
            if turn < len(later):
                prompt = prompt + answer + later[turn]


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def _run(a: argparse.Namespace, work: Path, affinity: bool, vocab: int) -> dict:
    config = _config(work / "serve_config.yaml", a, affinity)
    with local_cluster(a.checkpoint, config, work / "state", expert_shards=a.expert_shards, nodes=a.nodes,
                       extra=("--transport", a.transport)) as cluster:
        before, ttfts, lock = _counters(cluster.metrics_url), [], threading.Lock()
        t0 = time.monotonic()
        with ThreadPoolExecutor(a.concurrency) as pool:
            for f in [pool.submit(_converse, cluster.target, first, later, a.max_tokens, a.think_s,
                                  a.seed * 1000 + i, ttfts, lock)
                      for i, (first, later) in enumerate(_sessions(a, vocab))]:
                f.result()
        wall = time.monotonic() - t0
        time.sleep(2.0)                                   # the replicas' last counter push (every 0.5 s)
        after = _counters(cluster.metrics_url)
    per_replica = _growth(after["prompt"], before["prompt"])
    hit, prompt = sum(_growth(after["hit"], before["hit"]).values()), sum(per_replica.values())
    follow = [t for turn, t in ttfts if turn > 0 and t is not None]
    return {"router": "prefix affinity" if affinity else "power of two", "hit_tokens": hit,
            "prompt_tokens": prompt, "hit_rate": hit / prompt if prompt else float("nan"),
            "ttft_p50_followup_s": _quantile(follow, 0.5), "ttft_p90_followup_s": _quantile(follow, 0.9),
            "requests": len(ttfts), "wall_s": wall, "prompt_tokens_per_replica": per_replica}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2, help="engine replicas (held fixed)")
    p.add_argument("--expert-shards", type=int, default=2)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--transport", default="serve", choices=["serve", "local", "collective"])
    p.add_argument("--conversations", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=12, help="conversations in progress at once")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-len", type=int, default=128, help="tokens of the system prompt all share")
    p.add_argument("--user-len", type=int, default=48, help="new user tokens per turn")
    p.add_argument("--max-tokens", type=int, default=32, help="answer tokens per turn")
    p.add_argument("--think-s", type=float, default=2.0,
                   help="mean of the exponential pause between an answer and the next turn (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every run's results here")
    a = p.parse_args(argv)
    ensure_checkpoint(a.checkpoint)
    vocab = json.loads((Path(a.checkpoint) / "config.json").read_text())["vocab_size"]
    head = print_header()
    columns = ("round", "router", "hit rate", "hit tokens", "prompt tokens", "TTFT p50 (s)", "TTFT p90 (s)", "wall (s)")
    print("  ".join(f"{c:>15}" for c in columns), flush=True)
    runs = []
    for r in range(a.rounds):
        pair = {}
        for affinity in (True, False) if r % 2 == 0 else (False, True):    # alternate: the machine drifts
            with tempfile.TemporaryDirectory(prefix="moe-route-") as tmp:
                out = _run(a, Path(tmp), affinity, vocab)
            pair[affinity] = out
            runs.append({"round": r + 1, **out})
            row = (r + 1, out["router"], out["hit_rate"], out["hit_tokens"], out["prompt_tokens"],
                   out["ttft_p50_followup_s"], out["ttft_p90_followup_s"], out["wall_s"])
            print("  ".join(f"{v:>15.3f}" if isinstance(v, float) else f"{str(v):>15}" for v in row),
                  "  prompt tokens per replica:", sorted(out["prompt_tokens_per_replica"].values()), flush=True)
        on, off = pair[True], pair[False]
        print(f"  round {r + 1}, affinity / power of two: hit rate {on['hit_rate'] / off['hit_rate']:.2f}x, "
              f"TTFT p50 {on['ttft_p50_followup_s'] / off['ttft_p50_followup_s']:.2f}x, "
              f"wall {on['wall_s'] / off['wall_s']:.2f}x", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({**head, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

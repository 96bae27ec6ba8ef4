"""The simulator's cost model, measured on our real engine: step times, prefill cost, replica start.

    decode_step_s(B) = decode_step_base_s + decode_step_per_seq_s * B      (one token for each of B sequences)
    a request's slot time at batch B = prefill_s_per_token * prompt_tokens + output_tokens * decode_step_s(B)
    replica_cold_start_s = a fresh Python process importing torch + serving and loading the checkpoint
                           (+ extra_start_s: Ray actor scheduling, measured on a cluster if you have one)

`calibrate()` measures an in-process Engine (no Ray); `moe-serve calibrate --out FILE` records it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "cluster" / "calibration.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    decode_step_base_s: float = 0.010
    decode_step_per_seq_s: float = 0.001
    prefill_s_per_token: float = 0.0002
    max_batch: int = 16
    replica_cold_start_s: float = 5.0
    prompt_tokens_mean: float = 64.0
    output_tokens_mean: float = 64.0
    # provenance (informational)
    replica_load_s: float = 0.0          # in-process checkpoint -> Engine
    process_start_s: float = 0.0         # fresh interpreter: imports + load
    model: str = ""
    host: str = ""
    torch_threads: int = 1
    measured_at: str = ""

    def decode_step_s(self, batch: float) -> float:
        return self.decode_step_base_s + self.decode_step_per_seq_s * batch

    def service_s(self, batch: float) -> float:
        """Seconds one request holds a batch slot when the replica runs `batch` sequences."""
        return self.prefill_s_per_token * self.prompt_tokens_mean + self.output_tokens_mean * self.decode_step_s(batch)

    def first_token_s(self, batch: float) -> float:
        """Seconds from getting a slot to the first token (its prefill + one step)."""
        return self.prefill_s_per_token * self.prompt_tokens_mean + self.decode_step_s(batch)

    def replica_rps(self, batch: float | None = None) -> float:
        """Requests/s one replica completes running `batch` (default max_batch) sequences."""
        b = self.max_batch if batch is None else batch
        return b / self.service_s(b)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        d = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def default(cls) -> "Calibration":
        """cluster/calibration.json if shipped, else the built-in guesses."""
        return cls.load(DEFAULT_CALIBRATION) if DEFAULT_CALIBRATION.is_file() else cls()


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    b = max(b, 0.0)
    return max(my - b * mx, 1e-6), b


_LOAD_SNIPPET = """
import sys, time, torch
t0 = time.perf_counter()
torch.set_num_threads({threads})
from serving.autoscaling.calibration import build_engine
build_engine(sys.argv[1], {max_batch}, {max_len})
print(time.perf_counter() - t0)
"""


def build_engine(checkpoint: str | Path, max_batch: int, max_model_len: int):
    """An in-process Engine over `checkpoint`, experts local (what one EngineReplica holds)."""
    from serving.engine.engine import Engine
    from serving.engine.host_allocator import tune_host_allocator
    from serving.engine.scheduler import SchedulerConfig
    from serving.model.model import MoEModel
    from serving.model.tokenizer import Tokenizer
    from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport
    from serving.parallel.expert_shard import ExpertShardWorker
    from serving.parallel.placement import Placement
    tune_host_allocator()        # as an EngineReplica does
    model = MoEModel.from_checkpoint(checkpoint)
    placement = Placement.build(model.config, 1, "contiguous")
    dispatcher = ExpertDispatcher(placement, LocalTransport([ExpertShardWorker.from_checkpoint(checkpoint, placement, 0)]),
                                  model.config.num_experts)
    return Engine(model, dispatcher, Tokenizer.from_dir(checkpoint),
                  SchedulerConfig(max_num_seqs=max_batch, max_model_len=max_model_len,
                                  max_num_batched_tokens=max(2048, max_batch * max_model_len)))


def calibrate(*, checkpoint: str | Path | None = None, family: str = "mixtral", size: str = "small",
              max_batch: int = 16, prompt_tokens: int = 64, output_tokens: int = 64,
              batches: tuple[int, ...] | None = None, decode_steps: int = 8, threads: int = 1,
              measure_process_start: bool = True, extra_start_s: float = 0.0) -> Calibration:
    """Measure the engine: decode step time vs batch, prefill cost per token, replica start time.

    Without `checkpoint`, writes a seeded `family`/`size` checkpoint to a temp dir first."""
    import torch

    from serving.engine.request import GenerationRequest
    from serving.model.checkpoint import write_checkpoint
    from serving.model.sampling import SamplingParams

    torch.set_num_threads(threads)
    tmp = None
    if checkpoint is None:
        tmp = tempfile.TemporaryDirectory(prefix="moe-calib-")
        checkpoint = write_checkpoint(family, size, Path(tmp.name) / f"{family}-{size}")
    try:
        max_len = prompt_tokens + decode_steps + 2
        t0 = time.perf_counter()
        engine = build_engine(checkpoint, max_batch, max_len)
        load_s = time.perf_counter() - t0
        vocab = engine.model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        batches = batches or tuple(b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch)
        xs, decode, prefill_extra, prefill_tok = [], [], [], []
        for rep in range(2):                      # first pass warms up (allocations, kernels)
            for b in batches:
                for i in range(b):
                    ids = torch.randint(3, vocab, (prompt_tokens,), generator=g).tolist()
                    engine.add_request(GenerationRequest(request_id=f"c{rep}-{b}-{i}", prompt_token_ids=tuple(ids), sampling=SamplingParams(
                        max_tokens=decode_steps + 1, temperature=0.0, ignore_eos=True)), lambda ev: None)
                t = time.perf_counter()
                engine.step()                     # prefill of b x prompt_tokens (+ first token)
                t_prefill = time.perf_counter() - t
                steps = []
                while engine.has_work():
                    t = time.perf_counter()
                    if engine.step():
                        steps.append(time.perf_counter() - t)
                if rep and steps:
                    step = sorted(steps)[len(steps) // 2]
                    xs.append(b)
                    decode.append(step)
                    prefill_extra.append(max(0.0, t_prefill - step))
                    prefill_tok.append(b * prompt_tokens)
        a, slope = _fit_line(xs, decode)
        per_tok = sum(prefill_extra) / sum(prefill_tok)
        start_s = load_s
        if measure_process_start:
            code = _LOAD_SNIPPET.format(threads=threads, max_batch=max_batch, max_len=max_len)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, str(checkpoint)], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                               str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))})
            start_s = time.perf_counter() - t
        cfg = engine.model.config
        return Calibration(
            decode_step_base_s=round(a, 6), decode_step_per_seq_s=round(slope, 7),
            prefill_s_per_token=round(per_tok, 8), max_batch=max_batch,
            replica_cold_start_s=round(start_s + extra_start_s, 3),
            prompt_tokens_mean=float(prompt_tokens), output_tokens_mean=float(output_tokens),
            replica_load_s=round(load_s, 3), process_start_s=round(start_s, 3),
            model=f"{Path(str(checkpoint)).name}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
                  f"{cfg.num_experts} experts top-{cfg.top_k}",
            host=f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus", torch_threads=threads,
            measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    finally:
        if tmp is not None:
            tmp.cleanup()


# ---- CLI pieces (wired into `moe-serve calibrate` by serving/cli.py) ---------------------------------
def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_CALIBRATION, help="calibration JSON to write")
    p.add_argument("--checkpoint", default=None, help="existing checkpoint dir (default: write a seeded one)")
    p.add_argument("--family", default="mixtral", choices=["mixtral", "qwen2_moe"])
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--max-batch", type=int, default=16, help="the engine's max_num_seqs")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (an EngineReplica uses the Serve config's engine_threads, default 1)")
    p.add_argument("--extra-start-s", type=float, default=0.0,
                   help="added to the measured process start: Ray actor scheduling, image pull, ...")
    p.add_argument("--json", action="store_true", help="print the calibration as JSON")


def run_calibrate(args: argparse.Namespace) -> int:
    cal = calibrate(checkpoint=args.checkpoint, family=args.family, size=args.size, max_batch=args.max_batch,
                    prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, threads=args.threads,
                    extra_start_s=args.extra_start_s)
    cal.save(args.out)
    if args.json:
        print(cal.to_json(), end="")
    else:
        print(f"wrote {args.out}: decode step {cal.decode_step_base_s * 1e3:.2f} ms + "
              f"{cal.decode_step_per_seq_s * 1e3:.3f} ms/seq, prefill {cal.prefill_s_per_token * 1e6:.1f} us/token, "
              f"replica start {cal.replica_cold_start_s:.2f} s, {cal.replica_rps():.1f} req/s per replica at batch "
              f"{cal.max_batch}")
    return 0

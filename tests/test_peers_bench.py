"""benchmarks/peers.py helpers (no peer is run here): the cluster peer's derived Serve config
must stay a valid app config as cluster/serve_config.yaml evolves, and the reported run is the best."""
import importlib.util
from pathlib import Path

import pytest
import yaml

from serving.deployments.config import AppConfig
from serving.engine.scheduler import SchedulerConfig

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("peers", REPO / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)


def test_cluster_config_takes_the_whole_workload_in_one_unscaled_batch(tmp_path):
    a = peers.parse_args(["--checkpoint", str(tmp_path), "--num-prompts", "64", "--prompt-len", "64",
                          "--max-tokens", "64"])
    cfg = yaml.safe_load(peers.cluster_config(a, tmp_path).read_text())
    app = cfg["applications"][0]
    args = AppConfig.from_args({**app["args"], "checkpoint": str(tmp_path)})   # unknown / invalid args raise
    assert args.max_num_seqs == 64 and args.max_queued >= 64 and args.max_model_len >= 128
    SchedulerConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                    max_num_batched_tokens=args.max_num_batched_tokens)       # the engine accepts it
    scaled = [d for d in app["deployments"] if d.get("autoscaling_config")]
    assert scaled and all(d["autoscaling_config"]["max_replicas"] == 1 for d in scaled)
    assert not args.ping_pong and args.stream_chunk_tokens == 4     # the benchmark's throughput settings
    on = yaml.safe_load(peers.cluster_config(a, tmp_path, ping_pong=True).read_text())
    assert AppConfig.from_args({**on["applications"][0]["args"], "checkpoint": "x"}).ping_pong is True
    with pytest.raises(SystemExit):
        peers.parse_args(["--cluster-ping-pong", "maybe"])


def test_best_and_median_report_the_fastest_run():
    runs = [{"output_tokens_per_s": v, "ttft_p50_s": 1 / v, "duration_s": 4096 / v, "output_tokens": 4096}
            for v in (120.0, 600.0, 300.0)]
    r = peers.best_and_median(runs)
    assert r["output_tokens_per_s"] == 600.0 and r["median_output_tokens_per_s"] == 300.0
    assert r["ttft_p50_s"] == 1 / 600.0


def test_table_shows_low_load_ttft_against_the_vllm_server_row():
    results = [
        {"peer": "vllm", "label": "vLLM-CPU", "ok": True, "output_tokens_per_s": 900.0, "ttft_p50_s": 0.6},
        {"peer": "vllm-server", "label": "vLLM-CPU OpenAI server", "ok": True, "ttft_low_load_p50_s": 0.050},
        {"peer": "cluster (serve)", "label": "cluster (serve)", "ok": True, "output_tokens_per_s": 450.0,
         "ttft_p50_s": 1.5, "ttft_low_load_p50_s": 0.060},
        {"peer": "engine", "label": "engine (in-process)", "ok": False, "error": "RuntimeError: boom"},
    ]
    lines = peers.table(results).splitlines()
    cluster = next(line for line in lines if line.startswith("cluster (serve)"))
    assert "0.500" in cluster and "0.060" in cluster and "1.20" in cluster    # tok/s and TTFT ratios
    server = next(line for line in lines if line.startswith("vLLM-CPU OpenAI server"))
    assert "0.050" in server and "1.00" in server
    assert "FAILED: RuntimeError: boom" in lines[-1]
    a = peers.parse_args(["--peers", "cluster,vllm-server", "--low-load-requests", "4"])
    assert a.peer_list == ["cluster", "vllm-server"] and a.low_load_requests == 4


def test_round_summary_gives_each_ratio_per_round_and_its_median():
    def rec(rnd, peer, label, tps=None, ttft=None):
        return {"round": rnd, "peer": peer, "label": label, "ok": True, "output_tokens_per_s": tps,
                "ttft_low_load_p50_s": ttft}
    results = []
    for rnd, (v, e, c, srv, low) in enumerate([(2000, 1800, 800, 0.030, 0.045), (1000, 1100, 500, 0.020, 0.040),
                                               (1500, 1500, 600, 0.025, 0.025)]):
        results += [rec(rnd, "vllm", "vLLM-CPU", v), rec(rnd, "engine", "engine (in-process)", e),
                    rec(rnd, "cluster (collective)", "cluster (collective)", c, low),
                    rec(rnd, "vllm-server", "vLLM-CPU OpenAI server", ttft=srv)]
    lines = peers.round_summary(results).splitlines()
    engine = next(x for x in lines if x.lstrip().startswith("engine"))
    assert engine.split()[-4:] == ["0.90,", "1.10,", "1.00", "(1.00)"]
    cluster = [x for x in lines if x.lstrip().startswith("cluster")]
    assert cluster[0].split()[-4:] == ["0.40,", "0.50,", "0.40", "(0.40)"]
    assert cluster[1].split()[-4:] == ["1.50,", "2.00,", "1.00", "(1.50)"]
    # the references themselves get no ratio row
    assert not any(x.lstrip().startswith("vLLM") for x in lines[1:])


@pytest.mark.cluster
def test_engine_and_engine_shards_peers_run_the_same_workload(tmp_path, capsys):
    """The engine-shards peer runs for real (a 2-node local Ray cluster, 2 shard actors, the
    collective transport) next to the in-process engine, on the same prompts, with shard 0 in the
    engine's process and in an actor: every row completes every token, and the table carries each."""
    import json

    from serving.model.checkpoint import write_checkpoint
    ckpt = write_checkpoint("mixtral", "tiny", tmp_path / "tiny")
    out = tmp_path / "peers.json"
    rc = peers.main(["--checkpoint", str(ckpt), "--peers", "engine,engine-shards", "--repeat", "1",
                     "--num-prompts", "4", "--prompt-len", "8", "--max-tokens", "4", "--threads", "2",
                     "--low-load-requests", "0", "--engine-expert-shard", "on,off", "--json", str(out)])
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    rows = {r["label"]: r for r in rep["results"]}
    assert [r["peer"] for r in rep["results"]] == ["engine", "engine-shards", "engine-shards"], printed
    for r in rows.values():
        assert r["ok"], r.get("error")
        assert r["output_tokens"] == 16 and r["output_tokens_per_s"] > 0 and "note" not in r
    on = rows["engine + shard 1 actor, shard 0 in the engine (collective, no Serve/gRPC)"]
    off = rows["engine + 2 shard actors (collective, no Serve/gRPC)"]
    assert "--transport collective" in on["bench_command"] and "--engine-expert-shard on" in on["bench_command"]
    assert "--engine-expert-shard off" in off["bench_command"]
    assert "shard 0 in the engine" in printed and "engine + 2 shard actors" in printed
    assert rc == 0

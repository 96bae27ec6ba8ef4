"""`moe-serve up --grpc-ingress haproxy` on a real 2-node cluster: Ray Serve's HAProxy mode, where the
engine replica serves gRPC itself and HAProxy (the binary ray[serve] ships) listens on the gRPC port
in place of Ray's proxy actor. The API must answer as it does through the proxy: streams, statuses
with their trailers, the KServe face (bidirectional streaming included) and health; `down` must stop
HAProxy with the rest."""
from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster_harness import LOOPBACK, REPO, listening_addresses, running_cluster
from serving.api.protos import pb2
from serving.client import MoEClient, build_request
from serving.launcher import DEFAULT_CONFIG
from test_cluster_e2e import ckpt  # noqa: F401  (the e2e checkpoint fixture: written by transformers, 320 ids)

pytestmark = pytest.mark.cluster


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def cluster(ckpt, tmp_path_factory):
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["applications"][0]["args"]["tenants"] = {"quotas": {"capped": {"max_in_flight": 1}}, "in_flight_retry_s": 0.3}
    config = tmp_path_factory.mktemp("config") / "serve_config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with running_cluster(ckpt[0], tmp_path_factory.mktemp("state"), shards=2, nodes=2, config=config,
                         extra=("--grpc-ingress", "haproxy")) as state:
        yield state


def test_haproxy_answers_the_grpc_port_and_is_stopped_with_the_cluster(cluster):
    assert cluster["grpc_ingress"] == "haproxy"
    haproxies = [p for p in cluster["pids_at_start"] if _comm(p) == "haproxy"]
    assert haproxies, "no haproxy among the cluster's processes"      # `down` must stop it (the harness checks)
    port = cluster["grpc_target"].rsplit(":", 1)[1]
    listening = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert "haproxy" in listening and "127.0.0.1:" in listening, listening     # loopback, as http_options.host
    # and so are its admin frontends, the stats page and the Prometheus exporter, whose ports Ray's
    # template binds on every interface (serving/deployments/haproxy_admin.py, run in every worker)
    ours = [line for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
            if any(f"pid={p}," in line for p in haproxies)]
    configs = sorted((Path(cluster["ray_tmp"]) / "haproxy").glob("*/haproxy.cfg"))   # haproxy_env, one per node
    assert configs
    admin = [re.search(rf"^{section}\n\s+bind (\S+)$", cfg.read_text(), re.M).group(1)
             for cfg in configs for section in ("listen stats", "frontend prometheus")]
    local = {line.split()[3] for line in ours}
    assert all(a.startswith("127.0.0.1:") for a in local), ours
    assert {f"127.0.0.1:{a.rsplit(':', 1)[1]}" for a in admin} <= local, (admin, ours)
    # and so do the servers HAProxy balances over: the replicas' direct-ingress ports and the
    # fallback proxy's, gRPC ones included, which Ray binds on every interface
    # (serving/deployments/grpc_bind.py)
    servers = {int(m) for cfg in configs for m in re.findall(r"^\s+server \S+ \S+:(\d+)", cfg.read_text(), re.M)}
    assert len(servers) >= 4, servers          # HTTP and gRPC: the engine replica's and the fallback's
    for server_port in servers:
        listening = listening_addresses(server_port)
        assert listening and all(a.startswith(LOOPBACK) for a in listening), (server_port, listening)
    with grpc.insecure_channel(cluster["grpc_target"]) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_streams_statuses_and_trailers_pass_through(cluster, ckpt):
    ids = [5, 17, 99, 250, 3, 42, 7]
    import torch
    expected = ckpt[1].generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    with MoEClient(cluster["grpc_target"]) as c:
        chunks = list(c.generate(build_request(prompt_ids=ids, max_tokens=16, temperature=0)))
        done = c.complete(build_request(prompt_ids=ids, max_tokens=16, temperature=0))
        assert [t for ch in chunks for t in ch.token_ids] == list(done.token_ids) == expected
        assert chunks[-1].finish_reason == done.finish_reason != 0
        for call in ("generate", "complete"):
            with pytest.raises(grpc.RpcError) as ei:
                r = getattr(c, call)(build_request("hi", max_tokens=0))
                if call == "generate":
                    list(r)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ei.value.details().startswith("max_tokens:")
    with MoEClient(cluster["grpc_target"], tenant="capped") as capped:
        stream = capped.generate(build_request("hello", max_tokens=200, ignore_eos=True))
        next(stream)
        with pytest.raises(grpc.RpcError) as ei:            # its one slot is taken: shed, with pushback
            capped.complete(build_request("hello", max_tokens=2))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant 'capped'" in ei.value.details()
        assert dict(ei.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms") == "300"
        stream.close()                                       # cancels the call


def test_kserve_unary_and_bidirectional_streaming_pass_through(cluster, ckpt):
    import tritonclient.grpc as tc
    with MoEClient(cluster["grpc_target"]) as c:
        done = c.complete(build_request("hello world", max_tokens=8, temperature=0))
    model = ckpt[0].name
    prompt = tc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"hello world"], dtype=object))
    stream = tc.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    client = tc.InferenceServerClient(cluster["grpc_target"])
    try:
        assert client.is_model_ready(model)
        result = client.infer(model, [prompt], parameters={"max_tokens": 8, "temperature": 0.0})
        assert result.as_numpy("text_output")[0].decode() == "hello world" + done.text
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, [prompt, stream], parameters={"max_tokens": 8, "temperature": 0.0})
        client.async_stream_infer("nope", [prompt])
        client.stop_stream()
        got = [results.get(timeout=30) for _ in range(done.usage.completion_tokens + 1)]
        assert results.empty()
        assert "".join(r.as_numpy("text_output")[0].decode() for r, e in got if e is None) == done.text
        assert [str(e).split(":")[0] for _, e in got if e is not None] == ["NOT_FOUND"]
    finally:
        client.close()


def _kill_engine_replica(cluster) -> None:
    kill = ("import json, ray\n"
            f"ray.init(address={cluster['gcs_address']!r}, logging_level='ERROR')\n"
            "names = [a for a in ray.util.list_named_actors(all_namespaces=True) if '#EngineReplica#' in a['name']]\n"
            "for a in names:\n"
            "    ray.kill(ray.get_actor(a['name'], namespace=a['namespace']), no_restart=False)\n"
            "print(json.dumps(len(names)))\n")
    env = {**os.environ, "RAY_TMPDIR": cluster["ray_tmp"],
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", kill], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == 1, out.stderr[-2000:]


def test_a_lost_engine_replica_resets_its_stream_and_a_resumed_stream_loses_nothing(cluster):
    """Through HAProxy the client does not get the proxy's UNAVAILABLE with pushback (serving/api/
    proxy_status.py) when the replica dies mid-stream: HAProxy resets the stream, CANCELLED. The
    tokens streamed stand, the call ends promptly, new calls are served once Serve has replaced the
    replica, and `generate(resume=N)` goes on after the reset: a greedy stream ends with exactly the
    tokens of an undisturbed run."""
    request = build_request(prompt_ids=[9, 8, 7], max_tokens=240, temperature=0, ignore_eos=True)
    with MoEClient(cluster["grpc_target"]) as c:
        whole = [t for ch in c.generate(request) for t in ch.token_ids]
        streamed, code, t0 = [], None, time.monotonic()
        try:
            for chunk in c.generate(request, timeout_s=120):
                streamed.extend(chunk.token_ids)
                if len(streamed) == 4:
                    _kill_engine_replica(cluster)
        except grpc.RpcError as err:
            code = err.code()
        assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), code
        assert 4 <= len(streamed) < 240 and streamed == whole[:len(streamed)] and time.monotonic() - t0 < 60
        resumed = []
        for chunk in c.generate(request, timeout_s=120, resume=5):
            resumed.extend(chunk.token_ids)
            if len(resumed) == 4:
                _kill_engine_replica(cluster)
        assert resumed == whole
        done = c.complete(build_request(prompt_ids=[1, 2, 3], max_tokens=4, temperature=0), timeout_s=60)
        assert len(done.token_ids) == 4 and done.finish_reason == pb2.FINISH_REASON_LENGTH

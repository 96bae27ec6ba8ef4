"""End to end on a real cluster: 2 Ray nodes, 2 expert shards, Serve's gRPC proxy, grpcio over
loopback, the real metrics endpoint, a checkpoint written by transformers itself."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster_harness import (LOOPBACK, engine_after_placement, listening_addresses, moe_serve, ray_query,
                             running_cluster)
from hf_reference import build_hf_checkpoint
from serving.api.protos import pb2, pb2_grpc
from serving.client import MoEClient, build_request
from serving.launcher import DEFAULT_CONFIG
from serving.model.checkpoint import write_tokenizer

pytestmark = pytest.mark.cluster
VOCAB = 320
MAX_POS = 256


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # odd on purpose: head_dim 16 != hidden 48 / 4 heads, 5 experts, top-3
    path, hf = build_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", vocab_size=VOCAB,
                                   num_local_experts=5, num_experts_per_tok=3, max_position_embeddings=MAX_POS)
    write_tokenizer(path, VOCAB)
    return path, hf


@pytest.fixture(scope="module")
def cluster(ckpt, tmp_path_factory):
    # the shipped Serve config, plus one tenant quota: `capped` may hold 1 request per replica
    # (serving/api/tenants.py); every other caller is tenant "default", without a quota
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["applications"][0]["args"]["tenants"] = {"quotas": {"capped": {"max_in_flight": 1}}}
    config = tmp_path_factory.mktemp("config") / "serve_config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with running_cluster(ckpt[0], tmp_path_factory.mktemp("state"), shards=2, nodes=2, config=config) as state:
        yield state


def _hf_greedy(hf, ids, n=32):
    return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()


def test_health_and_reflection(cluster):
    # the gRPC port listens where http_options.host says (127.0.0.1), not on every interface as Ray
    # binds its gRPC servers (serving/deployments/grpc_bind.py)
    listening = listening_addresses(int(cluster["grpc_target"].rsplit(":", 1)[1]))
    assert listening and all(a.startswith(LOOPBACK) for a in listening), listening
    with grpc.insecure_channel(cluster["grpc_target"]) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        assert stub.Check(health_pb2.HealthCheckRequest(service="moe_serving.v1.MoEServing"),
                          timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert "moe_serving.v1.MoEServing" in services and "grpc.health.v1.Health" in services


def test_stream_and_complete(cluster):
    with MoEClient(cluster["grpc_target"]) as c:
        chunks = list(c.generate(build_request("hello world", max_tokens=12, temperature=0, logprobs=True)))
        done = c.complete(build_request("hello world", max_tokens=12, temperature=0))
    assert len(chunks) == 12
    assert all(len(ch.token_ids) == 1 and len(ch.logprobs) == 1 for ch in chunks)
    assert all(lp <= 0 for ch in chunks for lp in ch.logprobs)
    assert chunks[-1].finish_reason == pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens > 0
    assert [t for ch in chunks for t in ch.token_ids] == list(done.token_ids)
    assert "".join(ch.text for ch in chunks) == done.text
    assert done.finish_reason == pb2.FINISH_REASON_LENGTH


def test_tritonclient_gets_the_same_greedy_completion_as_moe_serving(cluster, ckpt):
    """KServe v2 (serving/api/kserve.py) on the real cluster, with an unmodified tritonclient: ModelInfer
    and ModelStreamInfer give the completion moe_serving.v1's Complete gives, token counts included."""
    import queue

    import numpy as np
    import tritonclient.grpc as tc

    with MoEClient(cluster["grpc_target"]) as c:
        done = c.complete(build_request("hello world", max_tokens=12, temperature=0, logprobs=True))
    model = Path(ckpt[0]).name                      # served_model_name unset: the checkpoint's directory
    prompt = tc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"hello world"], dtype=object))
    stream = tc.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    params = {"max_tokens": 12, "temperature": 0.0}
    client = tc.InferenceServerClient(cluster["grpc_target"])
    try:
        config = client.get_model_config(model).config          # Triton's extension, through Ray's proxy
        assert config.name == model and config.model_transaction_policy.decoupled
        assert [(m.name, m.state) for m in client.get_model_repository_index().models] == [(model, "READY")]
        assert client.is_server_ready() and client.is_model_ready(model)
        cumulative = tc.InferInput("return_cumulative_logprob", [1], "BOOL")
        cumulative.set_data_from_numpy(np.array([True]))
        result = client.infer(model, [prompt, cumulative], parameters=params)
        assert result.as_numpy("text_output")[0].decode() == "hello world" + done.text
        assert result.as_numpy("cumulative_logprob")[0] == pytest.approx(sum(done.logprobs), rel=1e-4, abs=1e-4)
        assert len(done.logprobs) == 12 and sum(done.logprobs) < 0
        assert result.as_numpy("num_output_tokens")[0] == done.usage.completion_tokens
        assert result.as_numpy("num_input_tokens")[0] == done.usage.prompt_tokens
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, [prompt, stream], parameters=params)
        client.stop_stream()
        chunks = []
        while not results.empty():
            result, error = results.get()
            assert error is None, error
            chunks.append(result.as_numpy("text_output")[0].decode())
        assert "".join(chunks) == done.text and len(chunks) == done.usage.completion_tokens
    finally:
        client.close()


def test_cli_greedy_matches_transformers(cluster, ckpt):
    ids = [5, 17, 99, 250, 3, 42, 7]
    out = moe_serve("generate", "--target", cluster["grpc_target"], "--prompt-ids", ",".join(map(str, ids)),
                    "--max-tokens", "32", "--temperature", "0", "--json")
    result = json.loads(out.stdout)
    expected = _hf_greedy(ckpt[1], ids)
    assert result["token_ids"] == expected
    assert result["finish_reason"] == ("length" if len(expected) == 32 else "stop")


def test_penalties_and_stop_ids_over_grpc_match_transformers(cluster, ckpt):
    """repetition_penalty, min_tokens, stop_token_ids and logit_bias through the whole path (gRPC,
    Serve, the engine, the expert shards) against transformers' generate with the same settings."""
    ids = [9, 31, 200, 4, 77, 150]
    plain = _hf_greedy(ckpt[1], ids, 16)
    stop = plain[0]                                   # the unconstrained answer would stop at once
    out = moe_serve("generate", "--target", cluster["grpc_target"], "--prompt-ids", ",".join(map(str, ids)),
                    "--max-tokens", "16", "--temperature", "0", "--ignore-eos", "--repetition-penalty", "1.5",
                    "--min-tokens", "3", "--stop-token-ids", str(stop), "--logprobs", "--top-logprobs", "3",
                    "--logit-bias", f"{plain[1]}=-100", "--json")
    result = json.loads(out.stdout)
    # top_logprobs (of the raw logits) came through the core process and the proxy: 3 per token, ordered
    assert len(result["top_logprobs"]) == len(result["token_ids"]) == len(result["logprobs"])
    for top, lp in zip(result["top_logprobs"], result["logprobs"]):
        assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"] >= -1e9
        assert lp <= top[0]["logprob"] + 1e-6
    expected = ckpt[1].generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, repetition_penalty=1.5,
                                min_new_tokens=3, eos_token_id=[stop], pad_token_id=0,
                                sequence_bias={(plain[1],): -100.0},
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    assert result["token_ids"] == expected and result["token_ids"][0] != stop
    assert result["finish_reason"] == ("stop" if expected[-1] == stop else "length")


def test_guided_decoding_over_grpc_holds_every_completion_to_its_schema(cluster, tmp_path):
    """--json-schema through the whole path (the CLI, gRPC, validation in the replica, the grammar
    compiled and applied in the engine core): 2 sampled completions of random weights, each valid
    JSON for the schema, each ending by itself; a spec that does not parse is INVALID_ARGUMENT."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"enum": ["red", "green"]}},
              "required": ["ok", "n", "tag"], "additionalProperties": False}
    spec = tmp_path / "schema.json"
    spec.write_text(json.dumps(schema))
    out = moe_serve("generate", "--target", cluster["grpc_target"], "--prompt-ids", "9,31,200,4",
                    "--max-tokens", "120", "--temperature", "0.8", "--seed", "11", "--n", "2",
                    "--json-schema", f"@{spec}", "--json")
    result = json.loads(out.stdout)
    assert len(result["completions"]) == 2
    for c in result["completions"]:
        doc = json.loads(c["text"])
        assert set(doc) == {"ok", "n", "tag"} and isinstance(doc["ok"], bool) and 0 <= doc["n"] <= 99, c
        assert doc["tag"] in ("red", "green") and c["finish_reason"] == "stop", c
    picked = json.loads(moe_serve("generate", "--target", cluster["grpc_target"], "--prompt-ids", "9,31",
                                  "--temperature", "1", "--seed", "5", "--n", "3", "--choice", "red", "green blue",
                                  "--json").stdout)
    assert all(c["text"] in ("red", "green blue") and c["finish_reason"] == "stop" for c in picked["completions"])
    bad = moe_serve("generate", "--target", cluster["grpc_target"], "--prompt", "x", "--regex", "[a-", check=False)
    assert bad.returncode == 2 and "INVALID_ARGUMENT: guided.regex: " in bad.stderr, bad.stderr


def test_a_chat_through_the_cli_gets_the_greedy_answer_to_its_templated_prompt(cluster, ckpt):
    """`moe-serve generate --message ROLE TEXT ...`: the replica renders the conversation with the
    checkpoint's chat template (ChatML here) and answers what transformers answers to the prompt
    its own apply_chat_template builds."""
    import transformers
    chat = [("system", "Be brief."), ("user", "hello"), ("assistant", "hi!"), ("user", "and then?")]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(ckpt[0]))
    ids = hf_tok.apply_chat_template([{"role": r, "content": c} for r, c in chat], add_generation_prompt=True,
                                     tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    flags = [f for r, c in chat for f in ("--message", r, c)]
    out = moe_serve("generate", "--target", cluster["grpc_target"], *flags, "--max-tokens", "8",
                    "--temperature", "0", "--json")
    result = json.loads(out.stdout)
    assert result["token_ids"] == _hf_greedy(ckpt[1], ids, 8)
    assert result["usage"]["prompt_tokens"] == len(ids)
    # `moe-serve tokenize`: the same conversation's ids, as the replica renders them, and its limits
    out = moe_serve("tokenize", "--target", cluster["grpc_target"], *flags, "--json")
    tokenized = json.loads(out.stdout)
    assert tokenized["token_ids"] == ids and tokenized["count"] == len(ids)
    assert tokenized["max_model_len"] > len(ids) and tokenized["max_tokens_limit"] >= 8


def _metric_sum(url: str, family: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in _scrape(url).splitlines() if l.startswith(family + "{"))


def test_prompt_logprobs_over_grpc_are_transformers_log_softmax(cluster, ckpt):
    """The prompt scored through the whole path (CLI, Serve's proxy, the engine, 2 expert shards
    on 2 nodes): each prompt token's logprob and the 2 most likely at each position equal
    transformers' log_softmax over one forward, also the second time, when the prompt's blocks
    are in the prefix cache; with n = 2 (Complete) they come once, beside the completions."""
    g = torch.Generator().manual_seed(29)
    ids = torch.randint(3, VOCAB, (37,), generator=g).tolist()
    with torch.no_grad():
        ref = ckpt[1](torch.tensor([ids])).logits[0].float().log_softmax(-1)       # row t: token t + 1
    chosen = torch.tensor([float(ref[t, ids[t + 1]]) for t in range(len(ids) - 1)])
    for _ in range(2):
        out = moe_serve("generate", "--target", cluster["grpc_target"], "--prompt-ids", ",".join(map(str, ids)),
                        "--max-tokens", "3", "--temperature", "0", "--prompt-logprobs", "2", "--json")
        result = json.loads(out.stdout)
        assert torch.allclose(torch.tensor(result["prompt_logprobs"]), chosen, atol=1e-4)
        assert len(result["prompt_top_logprobs"]) == len(ids) - 1
        for t, top in enumerate(result["prompt_top_logprobs"]):
            assert [p["token_id"] for p in top] == ref[t].topk(2).indices.tolist()
        assert result["usage"]["cached_prompt_tokens"] == 0 and result["token_ids"] == _hf_greedy(ckpt[1], ids, 3)
    with MoEClient(cluster["grpc_target"]) as c:
        done = c.complete(build_request(prompt_ids=ids, max_tokens=2, temperature=0.8, seed=3, n=2,
                                        prompt_logprobs=0))
    assert len(done.completions) == 2 and not done.prompt_top_logprobs
    assert torch.allclose(torch.tensor(list(done.prompt_logprobs)), chosen, atol=1e-4)


def test_a_repeated_prompt_is_served_from_the_prefix_cache_with_the_same_tokens(cluster, ckpt):
    """The same 40-token prompt three times over gRPC: a later one finds its first two KV blocks
    (32 tokens) cached on its engine replica (three calls: two land on the same replica even if
    there are two), every answer is transformers' greedy one, and the hits reach Prometheus."""
    g = torch.Generator().manual_seed(23)
    ids = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    hits = "moe_serve_prefix_cache_hit_tokens_total"
    before = _metric_sum(cluster["metrics_url"], hits)
    expected = _hf_greedy(ckpt[1], ids, 8)
    with MoEClient(cluster["grpc_target"]) as c:
        cached = []
        for _ in range(3):
            resp = c.complete(build_request(prompt_ids=ids, max_tokens=8, temperature=0))
            assert list(resp.token_ids) == expected
            cached.append(resp.usage.cached_prompt_tokens)
    assert cached[0] == 0 and max(cached[1:]) == 32        # the caller sees its hit in the usage
    deadline = time.monotonic() + 20                        # replicas push every 0.5 s
    while _metric_sum(cluster["metrics_url"], hits) - before < 32 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _metric_sum(cluster["metrics_url"], hits) - before >= 32


def test_concurrent_requests_of_different_lengths_keep_their_tokens(cluster, ckpt):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 40, 11, 1, 25)]
    results, errors = {}, []

    def one(i, ids):
        try:
            with MoEClient(cluster["grpc_target"]) as c:
                r = c.complete(build_request(prompt_ids=ids, max_tokens=32, temperature=0))
                results[i] = list(r.token_ids)
        except Exception as exc:   # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, p in enumerate(prompts):
        assert results[i] == _hf_greedy(ckpt[1], p), f"prompt {i} (len {len(p)})"


INVALID = [
    ("prompt", dict(prompt="")),
    ("max_tokens", dict(prompt="hi", max_tokens=0)),
    ("max_tokens", dict(prompt="hi", max_tokens=-3)),
    ("max_tokens", dict(prompt="hi", max_tokens=100000)),
    ("max_tokens", dict(prompt_ids=[5] * 200, max_tokens=100)),       # over the context length
    ("temperature", dict(prompt="hi", temperature=-0.5)),
    ("top_p", dict(prompt="hi", top_p=0.0)),
    ("top_p", dict(prompt="hi", top_p=1.5)),
    ("prompt.token_ids", dict(prompt_ids=[5, VOCAB + 7])),
    ("prompt.token_ids", dict(prompt_ids=[-1, 5])),
    ("prompt_logprobs", dict(prompt="hi", prompt_logprobs=21)),
]


@pytest.mark.parametrize("field,kwargs", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_requests_get_invalid_argument_naming_the_field(cluster, field, kwargs):
    with grpc.insecure_channel(cluster["grpc_target"]) as ch:
        stub = pb2_grpc.MoEServingStub(ch)
        req = build_request(**kwargs)
        for call in (lambda: list(stub.Generate(req, timeout=30)), lambda: stub.Complete(req, timeout=30)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert field in err.value.details()


def test_shards_run_on_distinct_nodes_and_hold_only_their_experts(cluster):
    info = ray_query(cluster, """
shards = [serve.get_deployment_handle(f"ExpertShard{s}", app_name="moe").describe.remote().result() for s in range(2)]
engine = serve.get_deployment_handle("EngineReplica", app_name="moe").ready.remote().result()
print(json.dumps({"shards": shards, "engine": engine, "deployments": sorted(serve.status().applications["moe"].deployments),
                  "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}))
""")
    # the engine replica answers the gRPC proxy itself (ingress `engine`, the shipped default)
    assert info["deployments"] == ["EngineReplica", "ExpertShard0", "ExpertShard1", "MetricsHubDeployment"]
    shards = info["shards"]
    assert len(set(info["nodes"])) == 2
    assert shards[0]["node_id"] != shards[1]["node_id"]
    assert {s["node_id"] for s in shards} == set(info["nodes"])
    assert info["engine"]["transport"] == "serve"
    assert info["engine"]["engine_process"] is False     # a thread of the replica with `serve` (engine_core.py)
    # the step loop runs ahead of the streaming threads (Ray's nice 15) where niceness may be lowered
    nice = 5 if os.geteuid() == 0 else 15
    assert info["engine"]["step_loop_nice"] == nice
    assert [s["forward_thread_nice"] for s in shards] == [nice, nice]   # the engine's warm-up called them
    # GEMM kernels built before the first request, by the engine's first step and by each shard
    assert info["engine"]["kernel_warm_up"]["gemms"] > 50
    assert all(s["kernel_warm_up"]["gemms"] > 30 for s in shards), [s["kernel_warm_up"] for s in shards]
    # `moe-serve up` starts Ray under SCHED_BATCH; the compute threads are back under SCHED_OTHER
    assert info["engine"]["process_policy"] == "batch" and info["engine"]["step_loop_policy"] == "other"
    assert [(s["process_policy"], s["forward_thread_policy"]) for s in shards] == [("batch", "other")] * 2
    for layer in ("0", "1"):
        held = [set(s["experts"][layer]) for s in shards]
        assert held[0].isdisjoint(held[1]) and held[0] | held[1] == set(range(5))


FAMILIES = ["moe_serve_requests_total", "moe_serve_time_to_first_token_seconds_count",
            "moe_serve_inter_token_latency_seconds_count", "moe_serve_e2e_request_latency_seconds_count",
            "moe_serve_prompt_tokens_total", "moe_serve_generation_tokens_total",
            "moe_serve_expert_routed_tokens_total", "moe_serve_engine_step_seconds_count", "moe_serve_model_info"]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_metrics_after_traffic(cluster):
    import time
    with MoEClient(cluster["grpc_target"]) as c:
        c.complete(build_request("metrics please", max_tokens=6, temperature=0))
        with pytest.raises(grpc.RpcError) as ei:           # this test's own refused request (not an earlier test's)
            c.complete(build_request("metrics please", max_tokens=0))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    deadline = time.monotonic() + 20
    while True:   # replicas push every 0.5 s
        text = _scrape(cluster["metrics_url"])
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name = line.split("{")[0].split(" ")[0]
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if all(values.get(f, 0) > 0 for f in FAMILIES) and 'status="INVALID_ARGUMENT"' in text \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for f in FAMILIES:
        assert values.get(f, 0) > 0, f"{f} missing or zero"
    assert "moe_serve_queue_depth{" in text and "moe_serve_running_requests{" in text
    routed = [l for l in text.splitlines() if l.startswith("moe_serve_expert_routed_tokens_total{")]
    assert {l.split('shard="')[1].split('"')[0] for l in routed} == {"0", "1"}
    assert 'status="INVALID_ARGUMENT"' in text and 'status="OK"' in text
    info = [l for l in text.splitlines() if l.startswith("moe_serve_model_info{")]
    assert info and all('family="mixtral"' in l and 'dtype="fp32"' in l and 'weights="float"' in l
                        and 'expert_shards="2"' in l and l.endswith(" 1.0") for l in info), info
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: `make test` installs Debian's prometheus package")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def _open_until_shed(open_stream, limit: int) -> tuple[list, grpc.RpcError | None]:
    """Open streams, each read to its first chunk, until one is refused (at most `limit`):
    (the open streams, the refusal or None)."""
    streams = []
    for _ in range(limit):
        s = open_stream()
        try:
            next(s)
        except grpc.RpcError as exc:
            return streams, exc
        streams.append(s)
    return streams, None


def test_a_tenant_over_its_quota_is_shed_while_other_callers_are_served(cluster):
    """Tenant `capped` (x-moe-tenant) may hold 1 request per engine replica: once its streams hold
    that, its next call is RESOURCE_EXHAUSTED naming the tenant, through Ray's proxy, while a caller
    of another tenant is served; a malformed tenant name is INVALID_ARGUMENT naming the header; once
    its streams end, `capped` is served again; the metrics count the shed call under its tenant."""
    target = cluster["grpc_target"]
    long_req = build_request(prompt_ids=[5, 6, 7], max_tokens=200, temperature=0, ignore_eos=True)
    short_req = build_request(prompt_ids=[5, 6], max_tokens=4, temperature=0)
    with MoEClient(target, 300, tenant="capped") as capped, MoEClient(target, 120) as anyone:
        streams, shed = _open_until_shed(lambda: capped.generate(long_req), 6)   # a replica holds one: <= 3
        assert shed is not None and shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, shed
        assert "tenant 'capped'" in shed.details() and "retry after" in shed.details()
        assert 1 <= len(streams) <= 3
        assert len(anyone.complete(short_req).token_ids) == 4                 # another tenant: served
        with MoEClient(target, 60, metadata=[("x-moe-tenant", "not a name")]) as bad:
            with pytest.raises(grpc.RpcError) as ei:
                bad.complete(short_req)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details().startswith("x-moe-tenant:")
        for s in streams:
            s.close()                               # cancels the RPC: the replica releases the lease
        deadline = time.monotonic() + 30
        while True:
            try:
                assert len(capped.complete(short_req).token_ids) == 4
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    deadline = time.monotonic() + 20
    while True:                                     # replicas push every 0.5 s
        lines = [l for l in _scrape(cluster["metrics_url"]).splitlines()
                 if l.startswith("moe_serve_tenant_requests_total{") and 'tenant="capped"' in l]
        seen = {status for status in ("RESOURCE_EXHAUSTED", "OK", "CANCELLED")
                if any(f'status="{status}"' in l for l in lines)}
        if len(seen) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert seen == {"RESOURCE_EXHAUSTED", "OK", "CANCELLED"}, lines


def _gauge_sum(text: str, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + "{"))


def test_overload_sheds_batch_first_with_pushback_and_cancel_frees_slots(cluster):
    """Batch streams fill batch's share of each engine replica's token budget (16 slots x 256
    = 4096 tokens, batch share 2048: 8 requests of 246). Admission is per replica and the engine
    autoscales (up to 3), so streams are opened until one is shed: RESOURCE_EXHAUSTED with a retry
    hint, while an interactive request is still served; cancelling the streams frees their slots."""
    long_req = build_request(prompt_ids=[5, 6, 7, 8, 9, 10], max_tokens=240, temperature=0, ignore_eos=True,
                             priority="batch")                                          # 246 tokens each
    with grpc.insecure_channel(cluster["grpc_target"]) as ch:
        stub = pb2_grpc.MoEServingStub(ch)
        streams, shed = _open_until_shed(lambda: stub.Generate(long_req, timeout=300), 40)  # 3 x 8 fill them
        assert shed is not None and shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, shed
        assert "retry after" in shed.details()            # Ray's proxy drops trailers on streams
        for _ in range(5):                                 # unary: trailer + google.rpc.RetryInfo
            try:
                stub.Complete(long_req, timeout=300)      # admitted if a new replica just came up
                continue
            except grpc.RpcError as exc:
                err = exc
                break
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(err.trailing_metadata() or ())
        assert int(trailers["grpc-retry-pushback-ms"]) > 0
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status
        info = error_details_pb2.RetryInfo()
        assert rpc_status.from_call(err).details[0].Unpack(info)
        assert info.retry_delay.ToMilliseconds() == int(trailers["grpc-retry-pushback-ms"])
        ok = stub.Complete(build_request(prompt_ids=[5, 6], max_tokens=4, temperature=0), timeout=120)
        assert len(ok.token_ids) == 4                                                  # interactive admitted
        for s in streams:
            s.cancel()
        # the engine reports on its own 0.5 s timer: the slots can read 0 before it has pushed the
        # cancelled streams' status, so wait for all three (bounded)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = _scrape(cluster["metrics_url"])
            if (_gauge_sum(text, "moe_serve_kv_slots_used") == 0 and 'status="RESOURCE_EXHAUSTED"' in text
                    and 'status="CANCELLED"' in text):
                break
            time.sleep(0.25)
        assert _gauge_sum(text, "moe_serve_kv_slots_used") == 0
        assert 'status="RESOURCE_EXHAUSTED"' in text and 'status="CANCELLED"' in text
    # shedding is an API outcome, not a fault: neither a replica nor the proxy logged a traceback for it
    # (serving/api/log_filters.py; Ray Serve logs "Request failed." with one otherwise)
    serve_logs = Path(cluster["ray_tmp"]) / "ray" / "session_latest" / "logs" / "serve"
    logs = sorted(serve_logs.glob("replica_*.log")) + sorted(serve_logs.glob("proxy_*.log"))
    assert any(p.name.startswith("proxy_") for p in logs) and any("EngineReplica" in p.name for p in logs), logs
    shed_tracebacks = [(p.name, line) for p in logs for line in p.read_text(errors="replace").splitlines()
                       if "RpcAbort: RESOURCE_EXHAUSTED" in line or "errors.Overloaded:" in line
                       or "status code StatusCode.RESOURCE_EXHAUSTED" in line]
    assert not shed_tracebacks, shed_tracebacks[:3]


def test_live_rebalance_keeps_in_flight_tokens_and_loads_only_new_experts(cluster, ckpt):
    """Runs last in this file: it changes the placement. A load-aware plan (hot experts
    replicated) is applied while a request streams; its tokens do not change."""
    ids = [11, 22, 33, 44, 55]
    req = build_request(prompt_ids=ids, max_tokens=64, temperature=0, ignore_eos=True)
    with MoEClient(cluster["grpc_target"]) as c:
        baseline = list(c.complete(req).token_ids)
        streamed, errors = [], []

        def stream():
            try:
                for chunk in c.generate(req):
                    streamed.extend(chunk.token_ids)
            except Exception as exc:   # surfaced below
                errors.append(exc)

        t = threading.Thread(target=stream)
        t.start()
        out = moe_serve("placement", "--checkpoint", str(ckpt[0]), "--expert-shards", "2", "--apply",
                        "--state-dir", cluster["state_dir"], "--json")
        plan = json.loads(out.stdout)["placement"]
        assert plan["version"] >= 1
        t.join(timeout=300)
        assert not errors and streamed == baseline
        assert engine_after_placement(cluster, 1)["placement_version"] == plan["version"]
        assert list(c.complete(req).token_ids) == baseline        # served by the new placement
    time.sleep(6)                                                 # shards drop experts after a grace period
    shards = ray_query(cluster, """
print(json.dumps([serve.get_deployment_handle(f"ExpertShard{s}", app_name="moe").describe.remote().result()
                  for s in range(2)]))
""")
    for d in shards:
        for layer, held in d["experts"].items():
            planned = {e for e, copies in enumerate(plan["copies"][layer]) if d["shard_id"] in copies}
            assert set(held) <= planned, (d["shard_id"], layer, held, planned)
    assert sum(d["experts_loaded_since_start"] for d in shards) > 0



def test_shard_replica_killed_mid_stream_loses_no_token(cluster, ckpt):
    """An expert shard replica dies while a request streams (the `serve` transport's calls go by
    value over Serve's gRPC data plane): the engine retries its step until Serve has a new
    replica, and the stream finishes with exactly the tokens an undisturbed run gives. One driver
    streams and kills, so the kill lands mid-stream (after 8 of 200 tokens)."""
    ids = [9, 8, 7, 6, 5, 4]
    with MoEClient(cluster["grpc_target"]) as c:
        baseline = list(c.complete(build_request(prompt_ids=ids, max_tokens=200, temperature=0,
                                                 ignore_eos=True)).token_ids)
    out = ray_query(cluster, f"""
from serving.client import MoEClient, build_request
from serving.launcher import DEFAULT_CONFIG
victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#ExpertShard0#" in a["name"]]
streamed, killed_at = [], None
with MoEClient({cluster["grpc_target"]!r}) as c:
    for chunk in c.generate(build_request(prompt_ids={ids!r}, max_tokens=200, temperature=0, ignore_eos=True),
                            timeout_s=300):
        streamed.extend(chunk.token_ids)
        if killed_at is None and len(streamed) >= 8:
            for a in victims:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
            killed_at = len(streamed)
print(json.dumps({{"killed": [a["name"] for a in victims], "killed_at": killed_at, "tokens": streamed}}))
""", timeout=400)
    assert len(out["killed"]) == 1 and out["killed_at"] is not None and out["killed_at"] < 100
    assert len(baseline) == 200 and out["tokens"] == baseline


def test_engine_replica_killed_mid_stream_answers_unavailable_and_a_resumed_stream_loses_nothing(cluster):
    """The engine replica streaming a request dies (Ray's proxy streams straight from it), twice:
    1. a plain stream ends with UNAVAILABLE naming the lost replica and when to retry, never
       INTERNAL, after the tokens it already had;
    2. a stream with `MoEClient.generate(resume=20)` carries on on the replacement replica and
       ends with exactly the tokens of an undisturbed run: seeded sampling with presence and
       frequency penalties (the continuation's resumed_tokens: the penalties count the tokens
       before the break, each seeded draw is keyed by its position).
    Last in the module: the cluster is back to one healthy engine replica when it ends."""
    ids = [9, 8, 7, 6]
    sampling = dict(temperature=0.8, seed=11, presence_penalty=0.5, frequency_penalty=0.3)
    with MoEClient(cluster["grpc_target"]) as c:
        baseline = list(c.complete(build_request(prompt_ids=ids, max_tokens=120, ignore_eos=True,
                                                 **sampling)).token_ids)
    out = ray_query(cluster, f"""
import grpc, time
from serving.client import MoEClient, build_request
from serving.launcher import DEFAULT_CONFIG

def kill_engine_replicas():
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#EngineReplica#" in a["name"]]
    for a in victims:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
    return len(victims)

def stream(resume):
    got, killed, error = [], None, None
    with MoEClient({cluster["grpc_target"]!r}) as c:
        try:
            for chunk in c.generate(build_request(prompt_ids={ids!r}, max_tokens=120, ignore_eos=True,
                                                  **{sampling!r}), timeout_s=120, resume=resume):
                got.extend(chunk.token_ids)
                if killed is None and len(got) >= 8:
                    killed = [len(got), kill_engine_replicas()]
        except grpc.RpcError as e:
            error = [e.code().name, e.details()]
    return {{"tokens": got, "killed": killed, "error": error}}

plain = stream(0)
t0, after = time.monotonic(), []
for _ in range(60):                          # bounded: the replacement replica starts in ~5-20 s
    try:
        with MoEClient({cluster["grpc_target"]!r}) as c:
            r = c.complete(build_request(prompt_ids=[1, 2, 3], max_tokens=4, temperature=0), timeout_s=60)
        after.append(["OK", len(r.token_ids)])
        break
    except grpc.RpcError as e:
        after.append([e.code().name, e.details()[:200]])
        if time.monotonic() - t0 > 120:
            break
        time.sleep(1)
resumed = stream(20)                         # each retry waits the 1 s the status asks for
print(json.dumps({{"plain": plain, "after": after, "resumed": resumed}}))
""", timeout=600)
    plain, resumed = out["plain"], out["resumed"]
    assert plain["killed"] is not None and plain["killed"][1] == 1, plain
    if cluster["grpc_ingress"] == "haproxy":     # HAProxy resets the stream (tests/test_cluster_haproxy.py)
        assert plain["error"] is not None and plain["error"][0] == "CANCELLED", plain
    else:                                          # Ray's proxy says why (serving/api/proxy_status.py)
        assert plain["error"] is not None and plain["error"][0] == "UNAVAILABLE", plain
        assert "replica serving this request was lost" in plain["error"][1] and "retry after" in plain["error"][1]
    assert plain["killed"][0] <= len(plain["tokens"]) < 120 and plain["tokens"] == baseline[:len(plain["tokens"])]
    assert out["after"][-1] == ["OK", 4], out["after"]
    assert all(code in ("OK", "UNAVAILABLE") for code, _ in out["after"]), out["after"]
    assert resumed["killed"] is not None and resumed["killed"][1] == 1 and resumed["error"] is None, resumed
    assert len(baseline) == 120 and resumed["tokens"] == baseline

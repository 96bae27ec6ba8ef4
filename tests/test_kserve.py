"""KServe v2 / Triton-compatible gRPC (serving/api/kserve.py) over real gRPC on loopback, driven by
the unmodified `tritonclient.grpc` client, against the test_api_service_grpc harness (a plain
grpc.aio server, the fake deterministic engine: token i of a request is "a", "b", ...)."""
from __future__ import annotations

import json
import queue
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import model_config_pb2 as triton_config_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from serving.api.kserve import INPUTS, OUTPUTS, KServeService, pack_bytes, unpack_bytes
from serving.api.kserve_protos import DATA_TYPES, METHODS, SERVICE_NAME, kserve
from serving.api.errors import InvalidRequest, MalformedRequest
from serving.api.tenants import TenantGate, TenantQuota, TenantsConfig, token_sha256
from serving.engine.request import Priority
from test_api_service_grpc import WAIT_S, h  # noqa: F401  (h: the harness fixture)

MODEL = "local"             # start_local_server's default model name
TOKEN = "kserve-token"


@pytest.fixture
def triton(h):
    client = tc.InferenceServerClient(h.target)
    try:
        yield client
    finally:
        client.close()


def _bytes_input(name: str, value: bytes | str) -> tc.InferInput:
    tensor = tc.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode() if isinstance(value, str) else value], dtype=object))
    return tensor


def _bool_input(name: str, value: bool) -> tc.InferInput:
    tensor = tc.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value]))
    return tensor


def _text(result, name: str = "text_output") -> str:
    return result.as_numpy(name)[0].decode()


def _raw_call(target: str, request, method: str = "ModelInfer"):
    """One unary call with our own messages: for requests tritonclient would not build."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{SERVICE_NAME}/{method}",
                                   request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                                   response_deserializer=kserve.ModelInferResponse.FromString)
        return call.with_call(request, timeout=WAIT_S)


def _request(inputs=(("text_input", "BYTES", [1], b"hi"),), **fields):
    """A ModelInferRequest with BYTES / BOOL inputs in `contents`."""
    req = kserve.ModelInferRequest(**{"model_name": MODEL, **fields})
    for name, datatype, shape, value in inputs:
        tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
        if datatype == "BOOL":
            tensor.contents.bool_contents.append(value)
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.append(value)
        else:
            tensor.contents.fp32_contents.append(value)
    return req


# ---- the schema ---------------------------------------------------------------------------------

def test_our_messages_are_the_same_on_the_wire_as_tritonclients():
    """Every field of every message we define has the number and type tritonclient's
    generated protocol has, repeated or not (ours live in a pool of their own, so both load in one process)."""
    for name, (client_streaming, server_streaming) in METHODS.items():
        theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[name]
        assert (theirs.client_streaming, theirs.server_streaming) == (client_streaming, server_streaming), name

    def fields(descriptor) -> dict:
        return {f.name: (f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None)
                for f in descriptor.fields}

    checked = 0
    for message in vars(kserve).values():
        ours = message.DESCRIPTOR
        theirs = (triton_pb2.DESCRIPTOR.message_types_by_name.get(ours.name)        # grpc_service.proto
                  or triton_config_pb2.DESCRIPTOR.message_types_by_name[ours.name])  # model_config.proto
        stack = [(ours, theirs)]
        while stack:
            a, b = stack.pop()
            assert a.full_name == b.full_name
            fa, fb = fields(a), fields(b)
            assert fa == {k: fb[k] for k in fa}, a.full_name
            stack += [(n, b.nested_types_by_name[n.name]) for n in a.nested_types]
            checked += 1
    assert checked >= 22
    theirs = {v.name: v.number for v in triton_config_pb2.DataType.DESCRIPTOR.values}
    assert DATA_TYPES == theirs
    wire = triton_pb2.ModelInferRequest(model_name="m", id="x", raw_input_contents=[b"\x01\x00\x00\x00a"])
    wire.parameters["max_tokens"].int64_param = 5
    parsed = kserve.ModelInferRequest.FromString(wire.SerializeToString())
    assert (parsed.id, parsed.parameters["max_tokens"].int64_param, list(parsed.raw_input_contents)) == \
        ("x", 5, [b"\x01\x00\x00\x00a"])


def test_raw_bytes_tensors_round_trip_and_truncation_is_named():
    values = [b"", b"hello", "ü".encode()]
    assert unpack_bytes(pack_bytes(values), "x") == values
    with pytest.raises(InvalidRequest, match=r"inputs\[text_input\]: raw BYTES element says 9 bytes, 2 remain"):
        unpack_bytes(b"\x09\x00\x00\x00hi", "inputs[text_input]")
    with pytest.raises(InvalidRequest, match="inside an element's 4-byte length"):
        unpack_bytes(b"\x01\x00", "inputs[text_input]")


def test_a_request_that_does_not_translate_is_rejected_after_authentication():
    """plan() turns a bad request into a MalformedRequest (validated after auth), never an error."""
    svc = KServeService(service=None, model_name=MODEL)
    plan = svc.plan(_request(id="r9", parameters={"top_k": kserve.InferParameter(string_param="x")}),
                    streaming_rpc=False)
    assert isinstance(plan.request, MalformedRequest)
    assert (plan.request.field, plan.request.request_id) == ("parameters[top_k]", "r9")
    plan = svc.plan(b"\xff\xff\xff", streaming_rpc=False)
    assert isinstance(plan.request, MalformedRequest) and plan.request.field == "request"


# ---- health and metadata ------------------------------------------------------------------------

def test_health_and_metadata(h, triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready("other") and not triton.is_model_ready(MODEL, "2")
    assert triton.get_server_metadata().name == "moe-serving"
    meta = triton.get_model_metadata(MODEL)
    assert (meta.name, list(meta.versions)) == (MODEL, ["1"])
    assert {(t.name, t.datatype) for t in meta.inputs} == {(t.name, t.datatype) for t in INPUTS.values()}
    assert [t.name for t in meta.outputs] == list(OUTPUTS)
    with pytest.raises(InferenceServerException) as ei:
        triton.get_model_metadata("other")
    assert ei.value.status() == "StatusCode.NOT_FOUND" and "model_name: unknown model 'other'" in ei.value.message()
    h.service.ready = False                 # draining: not ready, and inference is UNAVAILABLE
    assert triton.is_server_live() and not triton.is_server_ready() and not triton.is_model_ready(MODEL)
    with pytest.raises(InferenceServerException) as ei:
        triton.infer(MODEL, [_bytes_input("text_input", "hi")])
    assert ei.value.status() == "StatusCode.UNAVAILABLE"


def test_model_config_and_repository_index_as_tritonclient_reads_them(h, triton):
    """What perf_analyzer / genai-perf ask before they send a request: the model's config (tensors
    with Triton's data types, decoupled streaming, no batch dimension) and the repository index."""
    config = triton.get_model_config(MODEL).config
    assert (config.name, config.platform, config.max_batch_size) == (MODEL, "moe_serving", 0)
    assert config.model_transaction_policy.decoupled
    types = {t.name: (triton_config_pb2.DataType.Name(t.data_type), list(t.dims), t.optional) for t in config.input}
    assert types == {"text_input": ("TYPE_STRING", [1], False), "sampling_parameters": ("TYPE_STRING", [1], True),
                     "stream": ("TYPE_BOOL", [1], True), "exclude_input_in_output": ("TYPE_BOOL", [1], True),
                     **{f"return_{x}": ("TYPE_BOOL", [1], True)
                        for x in ("cumulative_logprob", "finish_reason", "num_output_tokens", "num_input_tokens")}}
    assert {t.name: triton_config_pb2.DataType.Name(t.data_type) for t in config.output} == {
        "text_output": "TYPE_STRING", "num_output_tokens": "TYPE_UINT32", "finish_reason": "TYPE_STRING",
        "num_input_tokens": "TYPE_UINT32", "cumulative_logprob": "TYPE_FP32"}
    assert triton.get_model_config(MODEL, "1").config.name == MODEL
    for name, version in (("other", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as ei:
            triton.get_model_config(name, version)
        assert ei.value.status() == "StatusCode.NOT_FOUND"
    index = triton.get_model_repository_index().models
    assert [(m.name, m.version, m.state) for m in index] == [(MODEL, "1", "READY")]
    h.service.ready = False
    assert [m.state for m in triton.get_model_repository_index().models] == ["UNAVAILABLE"]
    h.service.ready = True


def test_model_statistics_count_what_this_server_answered(h, triton):
    """Triton's ModelStatistics as tritonclient reads it (perf_analyzer reads it before and after a
    measurement): requests answered in full and failed ones (an overloaded call, an in-band stream
    failure), with their cumulative time; unknown models NOT_FOUND; "" = every model."""
    assert "statistics" in triton.get_server_metadata().extensions
    (zero,) = triton.get_inference_statistics(MODEL).model_stats
    assert (zero.name, zero.version, zero.inference_count, zero.last_inference) == (MODEL, "1", 0, 0)
    before_ms = time.time() * 1000
    for i in range(3):
        triton.infer(MODEL, [_bytes_input("text_input", "hi")], request_id=f"ok-{i}", parameters={"max_tokens": 2})
    with pytest.raises(InferenceServerException):
        triton.infer(MODEL, [_bytes_input("text_input", "hi")], request_id="busy-1")        # shed
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    triton.async_stream_infer(MODEL, [_bytes_input("text_input", "hi"), _bool_input("stream", True)],
                              request_id="s-1", parameters={"max_tokens": 2})
    triton.async_stream_infer(MODEL, [_bytes_input("text_input", "hi")], request_id="busy-2")
    assert len(_drain(results, 3)) == 3                # two streamed chunks, one in-band failure
    triton.stop_stream()
    (stats,) = triton.get_inference_statistics(MODEL, "1").model_stats
    inf = stats.inference_stats
    assert (stats.inference_count, stats.execution_count, inf.success.count, inf.fail.count) == (4, 4, 4, 2)
    assert inf.success.ns > 0 and inf.fail.ns > 0
    assert before_ms <= stats.last_inference <= time.time() * 1000
    assert [m.name for m in triton.get_inference_statistics("").model_stats] == [MODEL]
    for name, version in (("other", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as ei:
            triton.get_inference_statistics(name, version)
        assert ei.value.status() == "StatusCode.NOT_FOUND"


# ---- ModelInfer ---------------------------------------------------------------------------------

def test_infer_returns_the_completion_with_the_prompt_first_by_default(h, triton):
    result = triton.infer(MODEL, [_bytes_input("text_input", "hi")], request_id="r1", parameters={"max_tokens": 3})
    assert _text(result) == "hiabc"
    assert (result.as_numpy("num_output_tokens")[0], _text(result, "finish_reason"),
            result.as_numpy("num_input_tokens")[0]) == (3, "length", 3)          # BOS + 2 bytes
    assert result.as_numpy("text_output").shape == (1,) and result.get_response().id == "r1"
    result = triton.infer(MODEL, [_bytes_input("text_input", "hi"), _bool_input("exclude_input_in_output", True)],
                          parameters={"max_tokens": 2}, outputs=[tc.InferRequestedOutput("text_output")])
    assert _text(result) == "ab" and [o.name for o in result.get_response().outputs] == ["text_output"]
    rec = h.wait_records(2)[0]
    assert (rec.request_id, rec.status, rec.method, rec.completion_tokens) == ("r1", "OK", "ModelInfer", 3)


def test_cumulative_logprob_as_triton_vllm_backend_returns_it(h, triton):
    """return_cumulative_logprob (Triton's vLLM backend's input) adds the cumulative_logprob output:
    the sum of the generated tokens' logprobs (the fake engine's token i: -0.5 * (i + 1)); the
    engine is asked for logprobs only then, or when `outputs` names it."""
    result = triton.infer(MODEL, [_bytes_input("text_input", "hi"), _bool_input("return_cumulative_logprob", True),
                                  _bool_input("return_finish_reason", True)], parameters={"max_tokens": 3})
    assert result.as_numpy("cumulative_logprob").dtype == np.float32
    assert result.as_numpy("cumulative_logprob")[0] == pytest.approx(-3.0)
    assert _text(result, "finish_reason") == "length" and h.engine.requests[-1].sampling.logprobs
    plain = triton.infer(MODEL, [_bytes_input("text_input", "hi")], parameters={"max_tokens": 3})
    assert plain.as_numpy("cumulative_logprob") is None and not h.engine.requests[-1].sampling.logprobs
    named = triton.infer(MODEL, [_bytes_input("text_input", "hi")], parameters={"max_tokens": 2},
                         outputs=[tc.InferRequestedOutput("cumulative_logprob")])
    assert [o.name for o in named.get_response().outputs] == ["cumulative_logprob"]
    assert named.as_numpy("cumulative_logprob")[0] == pytest.approx(-1.5)
    # streamed: the sum so far, chunk by chunk
    got: queue.Queue = queue.Queue()
    triton.start_stream(lambda result, error: got.put((result, error)))
    try:
        triton.async_stream_infer(MODEL, [_bytes_input("text_input", "hi"), _bool_input("stream", True),
                                          _bool_input("return_cumulative_logprob", True)],
                                  parameters={"max_tokens": 3})
        sums = [got.get(timeout=WAIT_S) for _ in range(3)]
    finally:
        triton.stop_stream()
    assert [e for _, e in sums] == [None] * 3
    assert [float(r.as_numpy("cumulative_logprob")[0]) for r, _ in sums] == pytest.approx([-0.5, -1.5, -3.0])


def test_sampling_fields_reach_the_engine_from_parameters_and_json(h, triton):
    triton.infer(MODEL, [_bytes_input("text_input", "hi")], request_id="p1", priority=2,
                 parameters={"max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "seed": 11,
                             "stop": "zz", "ignore_eos": True})
    sampling = json.dumps({"max_tokens": "5", "temperature": "0", "top_k": 3, "stop": ["x", "y"], "seed": "2"})
    triton.infer(MODEL, [_bytes_input("text_input", "hi"), _bytes_input("sampling_parameters", sampling)],
                 request_id="p2")
    first, second = h.engine.requests[-2:]
    assert first.priority == Priority.BATCH and second.priority == Priority.INTERACTIVE
    s = first.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop, s.ignore_eos) == \
        (4, 0.5, pytest.approx(0.9), 7, 11, ("zz",), True)
    s = second.sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.seed, s.stop) == (5, 0.0, 3, 2, ("x", "y"))
    # the penalties and stops: scalars as parameters (a single stop id), lists in the JSON
    triton.infer(MODEL, [_bytes_input("text_input", "hi")], request_id="p3",
                 parameters={"max_tokens": 6, "repetition_penalty": 1.25, "presence_penalty": -1,
                             "frequency_penalty": 0.5, "min_tokens": 2, "stop_token_ids": 13})
    sampling = json.dumps({"max_tokens": 6, "stop_token_ids": [13, 14], "min_tokens": "3", "logit_bias": {"13": -100}})
    triton.infer(MODEL, [_bytes_input("text_input", "hi"), _bytes_input("sampling_parameters", sampling)],
                 request_id="p4")
    third, fourth = h.engine.requests[-2:]
    s = third.sampling
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.min_tokens, s.stop_token_ids) == \
        (1.25, -1.0, 0.5, 2, (13,))
    assert (fourth.sampling.min_tokens, fourth.sampling.stop_token_ids) == (3, (13, 14))
    assert fourth.sampling.logit_bias == ((13, -100.0),)


def test_vllms_structured_output_parameters_become_guided_decoding(h, triton):
    """sampling_parameters' structured_outputs (vLLM >= 0.11) and guided_decoding (before), as
    Triton's vLLM backend passes them to vLLM: each kind reaches the engine as a Guide."""
    import re
    from serving.model.guided import Guide
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [({"structured_outputs": {"json": schema}}, Guide("json_schema", json.dumps(schema))),
             ({"guided_decoding": {"json": json.dumps(schema)}}, Guide("json_schema", json.dumps(schema))),
             ({"structured_outputs": {"json_object": True}}, Guide("json_object")),
             ({"guided_decoding": {"regex": "[0-9]+", "json": None}}, Guide("regex", "[0-9]+")),
             ({"structured_outputs": {"grammar": 'root ::= "a"'}}, Guide("grammar", 'root ::= "a"'))]
    for i, (fields, guide) in enumerate(cases):
        triton.infer(MODEL, [_bytes_input("text_input", "hi"), _bytes_input("sampling_parameters", json.dumps(fields))],
                     request_id=f"g{i}")
        assert h.engine.requests[-1].sampling.guide == guide, fields
    choices = ["yes", "no (1.5*x)?", "a|b"]
    triton.infer(MODEL, [_bytes_input("text_input", "hi"),
                         _bytes_input("sampling_parameters", json.dumps({"structured_outputs": {"choice": choices}}))],
                 request_id="choice")
    guide = h.engine.requests[-1].sampling.guide
    assert guide.kind == "regex"
    assert [c for c in [*choices, "yes|no", "a", "no (1.5xx)?"] if re.fullmatch(guide.spec, c)] == choices


def _param(**kw):
    return {k: kserve.InferParameter(**v) for k, v in kw.items()}


def _guided_request(fields) -> object:
    return _request(inputs=(("text_input", "BYTES", [1], b"hi"),
                            ("sampling_parameters", "BYTES", [1], json.dumps(fields).encode())))


INVALID = [
    (_request(inputs=()), "inputs[text_input]: is required"),
    (_request(inputs=(("text_input", "FP32", [1], 1.0),)), "inputs[text_input].datatype: must be BYTES"),
    (_request(inputs=(("text_input", "BYTES", [2], b"hi"),)), "inputs[text_input].shape: [2] is not one element"),
    (_request(inputs=(("text_input", "BYTES", [1], b"\xff\xfe"),)), "inputs[text_input]: is not valid UTF-8"),
    (_request(inputs=(("text_input", "BYTES", [1], b""),)), "inputs[text_input]: text is empty"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"), ("text_input", "BYTES", [1], b"hi"))),
     "inputs[text_input]: given twice"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"), ("image", "BYTES", [1], b"x"))),
     "inputs[image]: unknown input"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"), ("stream", "BOOL", [1], True))),
     "inputs[stream]: true needs the streaming RPC ModelStreamInfer"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"), ("sampling_parameters", "BYTES", [1], b"{nope"))),
     "inputs[sampling_parameters]: is not JSON"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"), ("sampling_parameters", "BYTES", [1], b'{"n": 2}'))),
     "sampling_parameters.n: unknown field"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"),
                      ("sampling_parameters", "BYTES", [1], b'{"top_k": "many"}'))),
     "sampling_parameters.top_k: 'many' is not an int"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"), ("sampling_parameters", "BYTES", [1], b'{"top_k": 2}')),
              parameters=_param(top_k={"int64_param": 2})), "parameters[top_k]: also set in sampling_parameters"),
    (_request(parameters=_param(max_tokens={"string_param": "x"})), "parameters[max_tokens]: 'x' is not an int"),
    (_request(parameters=_param(stop_token_ids={"string_param": "x"})),
     "parameters[stop_token_ids]: must be an int or a list of ints"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"),
                      ("sampling_parameters", "BYTES", [1], b'{"stop_token_ids": [1, "2"]}'))),
     "sampling_parameters.stop_token_ids: must be an int or a list of ints"),
    (_request(parameters=_param(repetition_penalty={"double_param": 0.0})), "repetition_penalty: 0.0 must be in (0, 10]"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"),
                      ("sampling_parameters", "BYTES", [1], b'{"logit_bias": {"x": 1}}'))),
     "sampling_parameters.logit_bias: must be a JSON object of token id -> bias"),
    (_request(inputs=(("text_input", "BYTES", [1], b"hi"),
                      ("sampling_parameters", "BYTES", [1], b'{"logit_bias": {"99999999999": 1}}'))),
     "sampling_parameters.logit_bias: must be a JSON object"),
    (_request(parameters=_param(logit_bias={"string_param": "13"})), "parameters[logit_bias]: must be a JSON object"),
    (_request(parameters=_param(max_tokens={"int64_param": 99})), "max_tokens: 99 exceeds the limit 32"),
    (_request(parameters=_param(top_p={"double_param": 2.0})), "top_p: 2.0 must be in (0, 1]"),
    (_request(parameters=_param(priority={"uint64_param": 7})), "parameters[priority]: 7 is not a priority"),
    (_request(parameters=_param(sequence_id={"int64_param": 3})), "parameters[sequence_id]: stateful sequences"),
    (_request(parameters=_param(timeout={"int64_param": 3})), "parameters[timeout]: not supported"),
    (_request(parameters=_param(triton_enable_empty_final_response={"bool_param": True})),
     "parameters[triton_enable_empty_final_response]: a bool, on ModelStreamInfer only"),
    (_request(parameters=_param(beam_width={"int64_param": 3})), "parameters[beam_width]: unknown parameter"),
    (_request(outputs=[kserve.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
     "outputs[logits]: unknown output"),
    (_request(id="has space"), "id: must be printable ASCII"),
    (_request(raw_input_contents=[b"", b""]), "raw_input_contents: has 2 entries for 1 inputs"),
    (b"\xff\xff\xff\xff", "request: not a valid inference.ModelInferRequest"),
    (_guided_request({"structured_outputs": {"regex": "[a-"}}), "guided.regex: Regex parsing error"),
    (_guided_request({"guided_decoding": {"json": "{"}}), "guided.json_schema: is not valid JSON"),
    (_guided_request({"structured_outputs": {"regex": "a", "json_object": True}}),
     "sampling_parameters.structured_outputs: set exactly one of"),
    (_guided_request({"structured_outputs": {"choice": []}}),
     "sampling_parameters.structured_outputs.choice: must be a non-empty list"),
    (_guided_request({"guided_decoding": {"backend": "outlines"}}),
     "sampling_parameters.guided_decoding.backend: unknown field"),
    (_guided_request({"structured_outputs": {"json_object": True}, "guided_decoding": {"regex": "a"}}),
     "sampling_parameters.guided_decoding: set one of"),
]


@pytest.mark.parametrize("request_, details", INVALID, ids=[d.split(":")[0] for _, d in INVALID])
def test_invalid_requests_get_invalid_argument_naming_the_field(h, request_, details):
    with pytest.raises(grpc.RpcError) as ei:
        _raw_call(h.target, request_)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details().startswith(details), ei.value.details()
    assert not h.engine.requests


def test_overload_unknown_model_and_raw_inputs(h, triton):
    with pytest.raises(grpc.RpcError) as ei:       # the engine sheds it: pushback in the trailers
        _raw_call(h.target, _request(id="busy-1"))
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ei.value.details().endswith("retry after 250 ms")
    assert dict(ei.value.trailing_metadata())["grpc-retry-pushback-ms"] == "250"
    with pytest.raises(InferenceServerException) as ei:
        triton.infer(MODEL, [_bytes_input("text_input", "hi")], request_id="busy-2")
    assert ei.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    for name, version, field in (("other", "", "model_name"), (MODEL, "3", "model_version")):
        with pytest.raises(grpc.RpcError) as ei:
            _raw_call(h.target, _request(model_name=name, model_version=version, id=f"nf-{field}"))
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND and ei.value.details().startswith(field)
    # counted like every other request (moe_serve_requests_total{status="NOT_FOUND"}): a client
    # sending to the wrong model shows on the dashboards
    assert sorted((r.request_id, r.status, r.method) for r in h.wait_records(4)) == [
        ("busy-1", "RESOURCE_EXHAUSTED", "ModelInfer"), ("busy-2", "RESOURCE_EXHAUSTED", "ModelInfer"),
        ("nf-model_name", "NOT_FOUND", "ModelInfer"), ("nf-model_version", "NOT_FOUND", "ModelInfer")]
    raw = _request(inputs=())            # tritonclient's layout: data in raw_input_contents
    raw.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    raw.raw_input_contents.append(pack_bytes([b"hi"]))
    response, _ = _raw_call(h.target, raw)
    assert unpack_bytes(response.raw_output_contents[0], "text_output") == [b"hi" + b"abcdefghijklmnop"]


# ---- ModelStreamInfer ---------------------------------------------------------------------------

def _drain(results: queue.Queue, n: int) -> list:
    out, deadline = [], time.monotonic() + WAIT_S
    while len(out) < n and time.monotonic() < deadline:
        try:
            out.append(results.get(timeout=0.1))
        except queue.Empty:
            pass
    return out


def test_stream_interleaves_requests_and_answers_failures_in_band(h, triton):
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    prompt = _bytes_input("text_input", "hi")
    triton.async_stream_infer(MODEL, [prompt, _bool_input("stream", True)], request_id="slow-1",
                              parameters={"max_tokens": 4})
    triton.async_stream_infer(MODEL, [prompt], request_id="whole", parameters={"max_tokens": 3},
                              enable_empty_final_response=True)
    triton.async_stream_infer(MODEL, [prompt], request_id="busy-3")
    triton.async_stream_infer(MODEL, [prompt], request_id="bad", parameters={"top_p": 5.0})
    triton.async_stream_infer("other", [prompt], request_id="nf")
    triton.stop_stream()                   # sends the half-close; waits for the server to end the stream
    got = _drain(results, 9)
    assert results.empty()
    errors = sorted(str(e) for r, e in got if e is not None)
    assert errors == ["INVALID_ARGUMENT: top_p: 5.0 must be in (0, 1]",
                      "NOT_FOUND: model_name: unknown model 'other'; this server serves 'local'",
                      "RESOURCE_EXHAUSTED: engine queue full; retry after 250 ms"]
    by_id: dict[str, list] = {}
    for result, error in got:
        if error is None:
            by_id.setdefault(result.get_response().id, []).append(result)
    slow = by_id["slow-1"]                 # streamed: one response per token, no prompt
    assert [_text(r) for r in slow] == ["a", "b", "c", "d"]
    assert [r.as_numpy("num_output_tokens")[0] for r in slow] == [1, 2, 3, 4]
    assert [_text(r, "finish_reason") for r in slow] == ["", "", "", "length"]
    assert [r.get_response().parameters["triton_final_response"].bool_param for r in slow] == [False] * 3 + [True]
    whole = by_id["whole"]                 # not streamed: one response, then the empty final one
    assert _text(whole[0]) == "hiabc" and not whole[0].get_response().parameters["triton_final_response"].bool_param
    assert not whole[1].get_response().outputs and whole[1].get_response().parameters["triton_final_response"].bool_param
    # every request was recorded, the unknown model's too (refused before GenerateService)
    statuses = sorted((r.request_id, r.status, r.method) for r in h.wait_records(5))
    assert statuses == [("bad", "INVALID_ARGUMENT", "ModelStreamInfer"),
                        ("busy-3", "RESOURCE_EXHAUSTED", "ModelStreamInfer"), ("nf", "NOT_FOUND", "ModelStreamInfer"),
                        ("slow-1", "OK", "ModelStreamInfer"), ("whole", "OK", "ModelStreamInfer")]


def test_a_client_that_goes_away_cancels_its_streamed_requests(h):
    with grpc.insecure_channel(h.target) as channel:
        call = channel.stream_stream(f"/{SERVICE_NAME}/ModelStreamInfer",
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=kserve.ModelStreamInferResponse.FromString)
        req = _request(inputs=(("text_input", "BYTES", [1], b"hi"), ("stream", "BOOL", [1], True)),
                       id="slow-gone", parameters=_param(max_tokens={"int64_param": 30}))
        responses = call(iter([req]), timeout=WAIT_S)
        first = [next(responses) for _ in range(2)]
        assert [r.infer_response.id for r in first] == ["slow-gone"] * 2
        responses.cancel()
    deadline = time.monotonic() + WAIT_S
    while "slow-gone" not in h.engine.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "slow-gone" in h.engine.closed
    rec = h.wait_records(1)[0]
    assert (rec.request_id, rec.status) == ("slow-gone", "CANCELLED") and rec.completion_tokens < 30


# ---- tenants ------------------------------------------------------------------------------------

def test_tokens_are_checked_before_validation_and_health_stays_open(h, triton):
    h.service.tenants = TenantGate(TenantsConfig(quotas={"chat": TenantQuota(max_in_flight=4)},
                                                 tokens={token_sha256(TOKEN): "chat"}))
    assert triton.is_server_ready() and triton.get_model_metadata(MODEL).name == MODEL
    for params in ({"max_tokens": 2}, {"beam_width": 4}):         # valid, and invalid: both refused
        with pytest.raises(InferenceServerException) as ei:
            triton.infer(MODEL, [_bytes_input("text_input", "hi")], parameters=params)
        assert ei.value.status() == "StatusCode.UNAUTHENTICATED"
    auth = {"authorization": f"Bearer {TOKEN}"}
    result = triton.infer(MODEL, [_bytes_input("text_input", "hi")], parameters={"max_tokens": 2}, headers=auth,
                          request_id="t1")
    assert _text(result) == "hiab"
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth)
    triton.async_stream_infer(MODEL, [_bytes_input("text_input", "hi")], request_id="t2", parameters={"max_tokens": 2})
    triton.stop_stream()
    (result, error), = _drain(results, 1)
    assert error is None and _text(result) == "hiab"
    records = {r.request_id: r for r in h.wait_records(4)}
    assert (records["t1"].tenant, records["t2"].tenant) == ("chat", "chat")
    assert not {r.request_id for r in h.engine.requests} - {"t1", "t2"}


def test_an_in_band_error_carries_the_requests_id(h):
    with grpc.insecure_channel(h.target) as channel:
        call = channel.stream_stream(f"/{SERVICE_NAME}/ModelStreamInfer",
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=kserve.ModelStreamInferResponse.FromString)
        requests = [_request(model_name="other", id="nf"), _request(id="busy-9"), _request(id="ok", outputs=[
            kserve.ModelInferRequest.InferRequestedOutputTensor(name="finish_reason")])]
        responses = sorted(call(iter(requests), timeout=WAIT_S), key=lambda r: r.infer_response.id)
    assert [(r.infer_response.id, r.error_message.split(":")[0]) for r in responses] == \
        [("busy-9", "RESOURCE_EXHAUSTED"), ("nf", "NOT_FOUND"), ("ok", "")]
    assert [o.name for o in responses[2].infer_response.outputs] == ["finish_reason"]
    assert unpack_bytes(responses[2].infer_response.raw_output_contents[0], "finish_reason") == [b"length"]

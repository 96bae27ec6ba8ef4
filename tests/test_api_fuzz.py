"""Fuzz the gRPC API with bad input: hundreds of seeded random GenerateRequests built from edge
values of every field, sent over real gRPC on loopback (a grpc.aio server, the real validation, an
echo engine). Every call must end OK or INVALID_ARGUMENT naming a field, never INTERNAL or UNKNOWN,
an OK one must respect what it asked for, and the server must stay healthy. The same for the
KServe v2 face's ModelInfer (serving/api/kserve.py), where NOT_FOUND answers another model."""
from __future__ import annotations

import asyncio
import json
import math
import random
import re
import struct
import threading

import grpc
import pytest

from serving.api.local_server import ByteTokenizer, EchoEngine, start_local_server
from serving.api.protos import pb2
from serving.api.service import GenerateService, RequestRecord
from serving.api.validation import ApiLimits
from serving.client import MoEClient

TOK = ByteTokenizer()
LIMITS = ApiLimits(vocab_size=TOK.vocab_size, max_model_len=96, max_tokens_limit=48)
CASES = 400
WAIT_S = 10.0
# what an INVALID_ARGUMENT's details may start with: the proto field paths (serving/api/validation.py)
FIELDS = ("request", "prompt", "prompt.text", "prompt.token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "priority", "request_id")

I32 = (-(1 << 31), -1, 0, 1, 2, 47, 48, 49, 95, 96, 97, (1 << 31) - 1)
FLOATS = (math.nan, math.inf, -math.inf, -0.0, 0.0, -1e-30, 1e-30, 0.5, 1.0, 1.0000001, 2.0, 1e30, -1.0)
TEXTS = ("", "a", "hello world", "\x00\x01\x02", "é" * 40, "💥" * 30, "x" * 95, "x" * 96, "x" * 500,
         "\u202e\ufeffbidi", "line\nbreak\r\n\t")


def _valid_request(rng: random.Random) -> pb2.GenerateRequest:
    r = pb2.GenerateRequest(max_tokens=rng.randint(1, 16), priority=rng.choice((0, 1, 2)),
                            return_logprobs=rng.random() < 0.3, ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.5:
        r.text = rng.choice(("a", "hello world", "é" * 10, "💥" * 5, "line\nbreak\r\n\t"))
    else:
        r.token_ids.ids.extend(rng.randrange(1, TOK.vocab_size) for _ in range(rng.randint(1, 40)))
    return r


def _mutate(r: pb2.GenerateRequest, rng: random.Random) -> None:
    """Set one field to an edge value (many are invalid, some are the edges of valid)."""
    field = rng.choice(("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "priority",
                        "request_id", "clear_max_tokens"))
    if field == "prompt":
        kind = rng.choice(("none", "text", "ids", "empty_ids"))
        r.ClearField("prompt")
        if kind == "text":
            r.text = rng.choice(TEXTS)
        elif kind == "ids":
            pool = (-(1 << 31), -1, 0, 1, 2, 100, TOK.vocab_size - 1, TOK.vocab_size, (1 << 31) - 1)
            r.token_ids.ids.extend(rng.choice(pool) if rng.random() < 0.2 else rng.randrange(1, TOK.vocab_size)
                                   for _ in range(rng.choice((1, 2, 5, 40, 95, 96, 200))))
        elif kind == "empty_ids":
            r.token_ids.SetInParent()
    elif field == "max_tokens":
        r.max_tokens = rng.choice(I32)
    elif field == "clear_max_tokens":
        r.ClearField("max_tokens")                 # the default, capped by the room left
    elif field in ("temperature", "top_p"):
        setattr(r, field, rng.choice(FLOATS))
    elif field == "top_k":
        r.top_k = rng.choice(I32 + (TOK.vocab_size, TOK.vocab_size + 1))
    elif field == "seed":
        r.seed = rng.choice((-(1 << 63), -1, 0, 1, (1 << 63) - 1))
    elif field == "stop":
        r.stop.extend(rng.choice(("", "a", "b", "\x00", "é", "s" * 128, "s" * 129))
                      for _ in range(rng.choice((1, 3, 8, 9))))
    elif field == "priority":
        r.priority = rng.choice((3, 99, -5))       # open enum: unknown values reach the server
    else:
        r.request_id = rng.choice(("ok-1", "", "a" * 128, "a" * 129, "tab\there", "ünïcode", "\x7f", "id with space"))


def _random_request(rng: random.Random) -> pb2.GenerateRequest:
    """A valid request with 0-3 of its fields set to edge values."""
    r = _valid_request(rng)
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        _mutate(r, rng)
    return r


@pytest.fixture(scope="module")
def server():
    records: list[RequestRecord] = []
    service = GenerateService(TOK, LIMITS, EchoEngine(TOK), records.append)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv, port = asyncio.run_coroutine_threadsafe(start_local_server(service), loop).result(WAIT_S)
    try:
        yield f"127.0.0.1:{port}", records
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(0), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()


def _check_ok(req: pb2.GenerateRequest, token_ids: list[int], finish: int, logprobs: list[float]) -> None:
    assert finish in (pb2.FINISH_REASON_STOP, pb2.FINISH_REASON_LENGTH), finish
    if req.HasField("max_tokens"):
        assert 1 <= len(token_ids) <= req.max_tokens
    assert all(0 <= t < TOK.vocab_size for t in token_ids)
    if req.return_logprobs:
        assert len(logprobs) == len(token_ids) and all(lp <= 0 for lp in logprobs)


def test_random_requests_get_ok_or_invalid_argument_naming_a_field(server):
    target, records = server
    rng = random.Random(20261205)
    outcomes: dict[str, int] = {}
    with MoEClient(target, WAIT_S) as c:
        for i in range(CASES):
            req = _random_request(rng)
            stream = i % 2 == 0
            try:
                if stream:
                    chunks = list(c.generate(req))
                    _check_ok(req, [t for ch in chunks for t in ch.token_ids], chunks[-1].finish_reason,
                              [lp for ch in chunks for lp in ch.logprobs])
                else:
                    done = c.complete(req)
                    _check_ok(req, list(done.token_ids), done.finish_reason, list(done.logprobs))
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (i, req, err.code(), err.details())
                assert err.details().split(":")[0] in FIELDS, (i, req, err.details())
            outcomes[code] = outcomes.get(code, 0) + 1
        assert c.health() == "SERVING"
    # the seed exercises both outcomes plenty, and every call was accounted for exactly once
    assert outcomes.get("OK", 0) >= 20 and outcomes.get("INVALID_ARGUMENT", 0) >= 100, outcomes
    assert sorted(r.status for r in records) == sorted(k for k, n in outcomes.items() for _ in range(n))


@pytest.mark.parametrize("method", ["Complete", "Generate"])
def test_malformed_payloads_get_invalid_argument_and_the_server_goes_on(server, method):
    """Raw bytes that may not be a GenerateRequest (truncated, bit-flipped, random): those that do
    not parse get INVALID_ARGUMENT "request: ..." (serving/api/protos.py; gRPC alone says UNKNOWN),
    those that do are validated like any request, and the server keeps serving."""
    target, _ = server
    rng = random.Random(7)
    valid = pb2.GenerateRequest(text="hello", max_tokens=4).SerializeToString()
    with grpc.insecure_channel(target) as ch:
        if method == "Complete":
            raw = ch.unary_unary("/moe_serving.v1.MoEServing/Complete", request_serializer=None,
                                 response_deserializer=pb2.CompleteResponse.FromString)
        else:
            stream = ch.unary_stream("/moe_serving.v1.MoEServing/Generate", request_serializer=None,
                                     response_deserializer=pb2.GenerateResponse.FromString)
            raw = lambda payload, timeout: list(stream(payload, timeout=timeout))   # noqa: E731
        codes: dict[str, int] = {}
        malformed = 0
        for i in range(200):
            if i % 3 == 0:
                payload = valid[:rng.randrange(len(valid))]
            elif i % 3 == 1:
                b = bytearray(valid)
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                payload = bytes(b)
            else:
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            try:
                raw(payload, timeout=WAIT_S)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (payload, err.code(), err.details())
                assert err.details().split(":")[0] in FIELDS, err.details()
                malformed += err.details().startswith("request: not a valid")
            codes[code] = codes.get(code, 0) + 1
    assert malformed >= 20, codes          # the seed makes plenty that do not parse
    with MoEClient(target, WAIT_S) as c:
        assert c.health() == "SERVING"
        assert c.complete(prompt="hello", max_tokens=4).text == "hell"


# ---- KServe v2 (serving/api/kserve.py) ---------------------------------------------------------

KSERVE_FIELD = re.compile(r"^(inputs\[[^\]]*\](\.datatype|\.shape)?|parameters\[[^\]]*\]|sampling_parameters\.\w+|"
                          r"outputs\[[^\]]*\](\.parameters)?|raw_input_contents|id|request|max_tokens|"
                          r"temperature|top_p|top_k|seed|stop):")
PARAM_VALUES = ({"int64_param": 3}, {"int64_param": -(1 << 63)}, {"int64_param": (1 << 63) - 1},
                {"uint64_param": (1 << 64) - 1}, {"uint64_param": 2}, {"double_param": math.nan},
                {"double_param": 0.5}, {"double_param": -1.0}, {"bool_param": True}, {"string_param": ""},
                {"string_param": "7"}, {"string_param": "x"}, {})
JSON_VALUES = (0, 1, -1, 2**40, 0.5, "0.5", "nan", "inf", "", "x", True, None, [], ["a"], [1], {}, 1e400)


def _kserve_request(rng: random.Random, kserve):
    """A valid KServe request (raw or typed contents), then 0-3 fields set to edge values."""
    req = kserve.ModelInferRequest(model_name="local", id=rng.choice(("", "k1", "a" * 128)))
    text = rng.choice(("a", "hello world", "é" * 10, "💥" * 5)).encode()
    inputs = [("text_input", "BYTES", [1], text)]
    if rng.random() < 0.5:
        inputs.append(("sampling_parameters", "BYTES", [1], json.dumps({"max_tokens": rng.randint(1, 16)}).encode()))
    else:
        req.parameters["max_tokens"].int64_param = rng.randint(1, 16)
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        what = rng.choice(("datatype", "shape", "extra", "json", "param", "output", "model", "text", "stream"))
        if what == "datatype":
            name, _, shape, value = inputs[0]
            inputs[0] = (name, rng.choice(("FP32", "BOOL", "INT64", "", "BYTES")), shape, value)
        elif what == "shape":
            name, dtype, _, value = inputs[0]
            inputs[0] = (name, dtype, rng.choice(([], [0], [2], [1, 1], [-1], [1, 2])), value)
        elif what == "extra":
            inputs.append((rng.choice(("text_input", "image", "stream", "exclude_input_in_output")),
                           rng.choice(("BOOL", "BYTES")), [1], rng.choice((True, b"x"))))
        elif what == "json":
            inputs.append(("sampling_parameters", "BYTES", [1], rng.choice((
                b"{", b"[]", b"null", b"\xff", json.dumps({rng.choice(("max_tokens", "top_p", "top_k", "seed",
                                                                        "temperature", "stop", "ignore_eos", "n")):
                                                          rng.choice(JSON_VALUES)}).encode()))))
        elif what == "param":
            key = rng.choice(("max_tokens", "top_p", "top_k", "seed", "temperature", "stop", "ignore_eos",
                              "priority", "timeout", "sequence_id", "triton_enable_empty_final_response", "x"))
            req.parameters[key].CopyFrom(kserve.InferParameter(**rng.choice(PARAM_VALUES)))
        elif what == "output":
            req.outputs.add(name=rng.choice(("text_output", "finish_reason", "logits", "")))
        elif what == "model":
            req.model_name, req.model_version = rng.choice((("local", "1"), ("local", "2"), ("other", ""), ("", "")))
        elif what == "text":
            name, dtype, shape, _ = inputs[0]
            inputs[0] = (name, dtype, shape, rng.choice((b"", b"\xff\xfe", b"x" * 500, b"\x00")))
        elif what == "stream":
            inputs.append(("stream", "BOOL", [1], rng.random() < 0.5))
    raw = rng.random() < 0.5
    for name, dtype, shape, value in inputs:
        tensor = req.inputs.add(name=name, datatype=dtype, shape=shape)
        data = value if isinstance(value, bytes) else bytes([value])
        if raw:
            req.raw_input_contents.append(struct.pack("<I", len(data)) + data if dtype == "BYTES" else data)
        elif isinstance(value, bytes):
            tensor.contents.bytes_contents.append(value)
        else:
            tensor.contents.bool_contents.append(value)
    if raw and rng.random() < 0.1:                   # truncated raw data
        req.raw_input_contents[0] = req.raw_input_contents[0][:rng.randrange(len(req.raw_input_contents[0]))]
    return req


def test_random_kserve_requests_get_ok_invalid_argument_or_not_found(server):
    """400 seeded KServe requests (and 200 corrupt payloads) over real gRPC: every call ends OK,
    INVALID_ARGUMENT naming an input, parameter or field, or NOT_FOUND for another model."""
    from serving.api.kserve import unpack_bytes
    from serving.api.kserve_protos import SERVICE_NAME, kserve
    target, _ = server
    rng = random.Random(4242)
    outcomes: dict[str, int] = {}
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(f"/{SERVICE_NAME}/ModelInfer", request_serializer=None,
                              response_deserializer=kserve.ModelInferResponse.FromString)
        valid = _kserve_request(random.Random(1), kserve).SerializeToString()
        for i in range(CASES + 200):
            if i < CASES:
                req = _kserve_request(rng, kserve)
                payload = req.SerializeToString()
            else:
                req, b = None, bytearray(valid)
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                payload = bytes(b) if i % 2 else valid[:rng.randrange(len(valid))]
            try:
                response = call(payload, timeout=WAIT_S)
                code = "OK"
                assert len(response.outputs) == len(response.raw_output_contents) >= 1
                if req is not None and "text_output" in [o.name for o in response.outputs]:
                    index = [o.name for o in response.outputs].index("text_output")
                    (text,) = unpack_bytes(response.raw_output_contents[index], "text_output")
                    assert text.decode()
            except grpc.RpcError as err:
                code = err.code().name
                assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
                    (i, req, err.code(), err.details())
                pattern = KSERVE_FIELD if err.code() == grpc.StatusCode.INVALID_ARGUMENT else \
                    re.compile(r"^model_(name|version):")
                assert pattern.match(err.details()), (i, req, err.details())
            outcomes[code] = outcomes.get(code, 0) + 1
    assert outcomes.get("OK", 0) >= 50 and outcomes.get("INVALID_ARGUMENT", 0) >= 150, outcomes
    assert outcomes.get("NOT_FOUND", 0) >= 5, outcomes
    with MoEClient(target, WAIT_S) as c:
        assert c.health() == "SERVING"

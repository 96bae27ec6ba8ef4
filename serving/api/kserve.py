"""KServe v2 / Triton-compatible inference over gRPC (`inference.GRPCInferenceService`, the
Open Inference Protocol), in front of GenerateService: an unmodified `tritonclient.grpc` or KServe
client generates text from the served model, through the same port as moe_serving.v1.

The model (ModelMetadata says the same)
- One model, named AppConfig.served_model_name (default: the checkpoint directory's name),
  version "1" (an empty version means it too).
- Inputs, one element each (shape [1], or [1, 1] with a batch dimension):
      text_input               BYTES  the prompt, UTF-8 (required; a BOS token is prepended)
      sampling_parameters      BYTES  a JSON object of sampling fields (below); numbers may be
                                      given as strings, as Triton's vLLM backend accepts them
      stream                   BOOL   ModelStreamInfer only: one response per streamed chunk
      exclude_input_in_output  BOOL   false: text_output starts with the prompt. Default: false,
                                      except when streaming (Triton's vLLM backend does the same)
      return_cumulative_logprob BOOL  true: also the cumulative_logprob output (Triton's vLLM backend's)
      return_finish_reason, return_num_output_tokens, return_num_input_tokens
                               BOOL   accepted as Triton's vLLM backend takes them; those outputs
                                      come back by default here
- Request parameters (ModelInferRequest.parameters; tritonclient's `parameters=`): the same
  sampling fields, typed; `priority` (Triton's: 0 or 1 interactive, 2 batch, which is shed
  first); `triton_enable_empty_final_response` (set by tritonclient's
  `enable_empty_final_response=True`). A field set both ways is INVALID_ARGUMENT.
- Sampling fields: max_tokens, temperature, top_p, top_k, seed, stop (a string or a list),
  ignore_eos, repetition_penalty, presence_penalty, frequency_penalty, min_tokens, stop_token_ids
  (an int or a list), logit_bias (a JSON object, in sampling_parameters): moe_serving.v1.GenerateRequest's,
  with its defaults and limits. Guided decoding, in sampling_parameters only, as vLLM's SamplingParams
  take it through Triton's vLLM backend: `structured_outputs` (vLLM >= 0.11) or `guided_decoding`
  (before), a JSON object with exactly one of json (a schema: object or text), json_object (true),
  regex, grammar (EBNF) or choice (a list of strings: one of them exactly) -> GenerateRequest.guided.
- Outputs, all unless `outputs` names some, each shape [1]:
      text_output        BYTES   the completion; streaming, this chunk's text
      num_output_tokens  UINT32  tokens generated so far
      finish_reason      BYTES   "stop", "length" or "cancelled"; "" before the last chunk
      num_input_tokens   UINT32  prompt tokens (BOS included); 0 before the last chunk
      cumulative_logprob FP32    the sum of the generated tokens' log-probabilities so far (raw
                                 logits, as moe_serving.v1's logprobs); only with
                                 return_cumulative_logprob, or when `outputs` names it
  Data comes back in raw_output_contents (what tritonclient's `as_numpy` reads).
- Streamed responses carry the parameter `triton_final_response` (true on a request's last one),
  as Triton's decoupled models do.

Errors: the statuses of moe_serving.v1: INVALID_ARGUMENT naming the input, parameter or field
("inputs[text_input]: ...", "parameters[priority]: ...", "sampling_parameters.top_k: ...", or a
sampling field's own name when the engine's validation rejects its value); RESOURCE_EXHAUSTED with
retry pushback; UNAVAILABLE while draining; UNAUTHENTICATED with tenants. Also NOT_FOUND for a
model name or version this server does not serve. ModelStreamInfer answers a failed request
in-band (`error_message` "<CODE>: <details>", the request's id in `infer_response`) and goes on
with the stream's other requests. ServerLive/Ready, ModelReady, the metadata and ModelStatistics
(this replica's counts: InferenceCounts) need no token, like grpc.health.v1.

Every generation goes through GenerateService (auth, validation, tenant quotas, engine,
metrics): a KServe request becomes a moe_serving.v1.GenerateRequest first, or, when its tensors
do not translate, a MalformedRequest that validation rejects after authentication.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import struct
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, AsyncIterator, Sequence

import grpc
from google.protobuf.message import DecodeError

from serving.api.errors import InvalidRequest, MalformedRequest, RpcAbort
from serving.api.kserve_protos import DATA_TYPES, kserve
from serving.api.protos import pb2, set_guided
from serving.api.service import GenerateService, set_status

logger = logging.getLogger(__name__)

MODEL_VERSION = "1"
SERVER_NAME = "moe-serving"
PLATFORM = "moe_serving"


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSpec:
    name: str
    datatype: str            # KServe datatype: BYTES, BOOL, UINT32, ...
    shape: tuple[int, ...] = (1,)


INPUTS: dict[str, TensorSpec] = {t.name: t for t in (
    TensorSpec(name="text_input", datatype="BYTES"),
    TensorSpec(name="sampling_parameters", datatype="BYTES"),
    TensorSpec(name="stream", datatype="BOOL"),
    TensorSpec(name="exclude_input_in_output", datatype="BOOL"),
    TensorSpec(name="return_cumulative_logprob", datatype="BOOL"),
    TensorSpec(name="return_finish_reason", datatype="BOOL"),
    TensorSpec(name="return_num_output_tokens", datatype="BOOL"),
    TensorSpec(name="return_num_input_tokens", datatype="BOOL"),
)}
OUTPUTS: dict[str, TensorSpec] = {t.name: t for t in (
    TensorSpec(name="text_output", datatype="BYTES"),
    TensorSpec(name="num_output_tokens", datatype="UINT32"),
    TensorSpec(name="finish_reason", datatype="BYTES"),
    TensorSpec(name="num_input_tokens", datatype="UINT32"),
    TensorSpec(name="cumulative_logprob", datatype="FP32"),
)}
#: The outputs a request gets when it names none (cumulative_logprob needs logprobs computed: asked for).
DEFAULT_OUTPUTS = ("text_output", "num_output_tokens", "finish_reason", "num_input_tokens")

#: Sampling fields (GenerateRequest's) and the Python type each takes.
SAMPLING_FIELDS: dict[str, type] = {"max_tokens": int, "temperature": float, "top_p": float,
                                    "top_k": int, "seed": int, "stop": list, "ignore_eos": bool,
                                    "repetition_penalty": float, "presence_penalty": float,
                                    "frequency_penalty": float, "min_tokens": int,
                                    "stop_token_ids": tuple,     # tuple: an int or a list of ints
                                    "logit_bias": dict}          # {"token id": bias}, in the JSON only
#: vLLM's names for its guided-decoding parameters (sampling_parameters JSON only), newest first.
GUIDED_FIELDS = ("structured_outputs", "guided_decoding")
_GUIDED_KINDS = ("json", "json_object", "regex", "grammar", "choice")
_INT32 = (-2**31, 2**31 - 1)
_INT_RANGE = {"max_tokens": _INT32, "top_k": _INT32, "min_tokens": _INT32, "seed": (-2**63, 2**63 - 1)}
PRIORITIES = {0: pb2.PRIORITY_UNSPECIFIED, 1: pb2.PRIORITY_INTERACTIVE, 2: pb2.PRIORITY_BATCH}
EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL = "triton_final_response"
#: Triton request parameters this server does not implement (stateful sequences, its own timeout).
_UNSUPPORTED = {"sequence_id": "stateful sequences are not supported",
                "sequence_start": "stateful sequences are not supported",
                "sequence_end": "stateful sequences are not supported",
                "timeout": "not supported; set a gRPC deadline (tritonclient: client_timeout=)"}
_FINISH_NAMES = {pb2.FINISH_REASON_STOP: "stop", pb2.FINISH_REASON_LENGTH: "length",
                 pb2.FINISH_REASON_CANCELLED: "cancelled"}
#: GenerateRequest fields that a KServe caller knows by another name (validation's details start
#: with the field).
_KSERVE_FIELD = {"prompt": "inputs[text_input]", "request_id": "id"}


@dataclass(kw_only=True, slots=True)
class InferenceCounts:
    """The inference requests for the model one KServeService (one replica) has answered since it
    started: Triton's ModelStatistics. Success: answered in full; fail: ended with an error status
    (in band on a stream, or the call's); a request whose client went away counts in neither.
    Durations are cumulative ns from receipt to the last response."""
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0             # when the last one ended, ms since the epoch

    def record(self, ok: bool, since_ns: int) -> None:
        ns = time.monotonic_ns() - since_ns
        if ok:
            self.success_count += 1
            self.success_ns += ns
        else:
            self.fail_count += 1
            self.fail_ns += ns
        self.last_inference_ms = int(time.time() * 1000)


@dataclass(kw_only=True, slots=True)
class _Plan:
    """One KServe inference request, translated."""
    request: Any                      # pb2.GenerateRequest, or a MalformedRequest to be rejected
    request_id: str
    stream: bool = False
    prompt_prefix: str = ""           # put before the completion's text (exclude_input_in_output false)
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    empty_final: bool = False


@dataclass(kw_only=True, slots=True)
class _Progress:
    """What a request has produced so far."""
    text: list[str] = field(default_factory=list)
    output_tokens: int = 0
    input_tokens: int = 0
    finish: str = ""
    cumulative_logprob: float = 0.0


class _RequestStatus:
    """The gRPC context GenerateService sees for one KServe request. The status it sets stays
    here (one ModelStreamInfer stream carries many requests, and no one of them may end it); the
    caller's metadata (its tenant) is the call's."""

    def __init__(self, call: Any):
        self.call = call
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers: tuple = ()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        name, sep, rest = details.partition(":")
        self.details = f"{_KSERVE_FIELD[name]}{sep}{rest}" if sep and name in _KSERVE_FIELD else details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self.trailers = tuple(metadata)

    def invocation_metadata(self) -> Sequence[tuple[str, Any]]:
        return self.call.invocation_metadata() if self.call is not None else ()

    @property
    def code_name(self) -> str:
        return (self.code or grpc.StatusCode.UNKNOWN).name


class NotServed(Exception):
    """The request names a model or version this server does not serve (NOT_FOUND)."""

    def __init__(self, message: str, request_id: str):
        super().__init__(message)
        self.request_id = request_id


# ---- tensors ----------------------------------------------------------------------------------

def pack_bytes(values: Sequence[bytes]) -> bytes:
    """KServe's raw BYTES layout: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def unpack_bytes(raw: bytes, where: str) -> list[bytes]:
    values, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidRequest(where, "raw BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InvalidRequest(where, f"raw BYTES element says {n} bytes, {len(raw) - pos} remain")
        values.append(raw[pos:pos + n])
        pos += n
    return values


def _input_value(tensor: Any, raw: bytes | None) -> Any:
    """The one element of an input tensor: bytes for BYTES, bool for BOOL."""
    where = f"inputs[{tensor.name}]"
    spec = INPUTS.get(tensor.name)
    if spec is None:
        raise InvalidRequest(where, f"unknown input; this model takes {sorted(INPUTS)}")
    if tensor.datatype != spec.datatype:
        raise InvalidRequest(f"{where}.datatype", f"must be {spec.datatype}, got {tensor.datatype!r}")
    if math.prod(tensor.shape) != 1 or any(d < 0 for d in tensor.shape):
        raise InvalidRequest(f"{where}.shape", f"{list(tensor.shape)} is not one element; use [1] or [1, 1]")
    if spec.datatype == "BYTES":
        values = unpack_bytes(raw, where) if raw is not None else list(tensor.contents.bytes_contents)
    else:
        values = [b != 0 for b in raw] if raw is not None else list(tensor.contents.bool_contents)
    if len(values) != 1:
        raise InvalidRequest(where, f"holds {len(values)} elements of data; its shape says 1")
    return values[0]


def _output_tensor(name: str, value: str | int | float) -> tuple[Any, bytes]:
    spec = OUTPUTS[name]
    raw = (pack_bytes([value.encode()]) if spec.datatype == "BYTES"
           else struct.pack("<f", value) if spec.datatype == "FP32" else struct.pack("<I", value))
    return kserve.ModelInferResponse.InferOutputTensor(name=name, datatype=spec.datatype,
                                                       shape=list(spec.shape)), raw


# ---- sampling fields --------------------------------------------------------------------------

def _typed(name: str, value: Any, where: str) -> Any:
    """`value` as sampling field `name` takes it (numbers and booleans may come as strings)."""
    kind = SAMPLING_FIELDS[name]
    if isinstance(value, str) and kind in (int, float, bool):
        text = value.strip().lower()
        try:
            value = {"true": True, "false": False}[text] if kind is bool else kind(text)
        except (KeyError, ValueError):
            raise InvalidRequest(where, f"{value!r} is not a{'n' if kind is int else ''} "
                                 f"{kind.__name__}") from None
    if kind is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(where, "must be a string or a list of strings")
        return value
    if kind is dict:
        bad = InvalidRequest(where, 'must be a JSON object of token id -> bias, e.g. {"13": -100}')
        if not isinstance(value, dict):
            raise bad
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad
            try:
                tok = int(k)
            except ValueError:
                raise bad from None
            if not _INT32[0] <= tok <= _INT32[1]:
                raise bad
            out[tok] = float(v)
        return out
    if kind is tuple:
        value = [value] if type(value) is int else value
        if not isinstance(value, list) or not all(type(v) is int and _INT32[0] <= v <= _INT32[1] for v in value):
            raise InvalidRequest(where, "must be an int or a list of ints")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise InvalidRequest(where, f"must be a{'n' if kind is int else ''} {kind.__name__}, "
                             f"got {type(value).__name__}")
    if name in _INT_RANGE and not _INT_RANGE[name][0] <= value <= _INT_RANGE[name][1]:
        raise InvalidRequest(where, f"{value} is out of range")
    return value


@functools.cache
def _package_version() -> str:
    try:
        return version("moe-serving")
    except PackageNotFoundError:      # run from a source tree that was not pip-installed
        return "0"


def _triton_type(datatype: str) -> int:
    """A KServe tensor datatype (BYTES, BOOL, UINT32, ...) as Triton's model-config DataType."""
    return DATA_TYPES["TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"]


def _fail(grpc_context: Any, code: grpc.StatusCode, details: str, trailers: Sequence[tuple[str, Any]] = ()) -> None:
    """End a unary RPC with this status: on `grpc_context` (the caller then returns an empty
    response), or, with no context, by raising RpcAbort."""
    if grpc_context is None:
        raise RpcAbort(code, details)
    set_status(grpc_context, code, details, trailers)


def _parameter(param: Any) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind is not None else None


class KServeService:
    """The RPCs of inference.GRPCInferenceService over a GenerateService (a plain object: the Serve
    deployment's methods and the local grpc.aio server both delegate here). Requests may come as
    bytes (they are parsed here, so bytes that do not parse get INVALID_ARGUMENT) or messages."""

    def __init__(self, service: GenerateService, model_name: str):
        self.service = service
        self.model_name = model_name
        self.counts = InferenceCounts()

    # ---- health and metadata -----------------------------------------------------------------

    def server_live(self, request: Any, grpc_context: Any = None) -> Any:
        return kserve.ServerLiveResponse(live=True)

    def server_ready(self, request: Any, grpc_context: Any = None) -> Any:
        return kserve.ServerReadyResponse(ready=self.service.ready)

    def model_ready(self, request: Any, grpc_context: Any = None) -> Any:
        req = self._parse(kserve.ModelReadyRequest, request, grpc_context)
        ready = req is not None and self._serves(req.name, req.version) and self.service.ready
        return kserve.ModelReadyResponse(ready=ready)

    def server_metadata(self, request: Any, grpc_context: Any = None) -> Any:
        return kserve.ServerMetadataResponse(name=SERVER_NAME, version=_package_version(), extensions=["statistics"])

    def model_metadata(self, request: Any, grpc_context: Any = None) -> Any:
        if not self._served_model(kserve.ModelMetadataRequest, request, grpc_context):
            return kserve.ModelMetadataResponse()
        meta = kserve.ModelMetadataResponse.TensorMetadata
        return kserve.ModelMetadataResponse(
            name=self.model_name, versions=[MODEL_VERSION], platform=PLATFORM,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in INPUTS.values()],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in OUTPUTS.values()])

    def model_config(self, request: Any, grpc_context: Any = None) -> Any:
        """Triton's ModelConfig: the tensors of ModelMetadata with Triton's data types, no batch
        dimension (max_batch_size 0: the engine batches continuously), decoupled (ModelStreamInfer
        may answer one request with many responses)."""
        if not self._served_model(kserve.ModelConfigRequest, request, grpc_context):
            return kserve.ModelConfigResponse()
        return kserve.ModelConfigResponse(config=kserve.ModelConfig(
            name=self.model_name, platform=PLATFORM, backend=PLATFORM, max_batch_size=0,
            input=[kserve.ModelInput(name=t.name, data_type=_triton_type(t.datatype), dims=list(t.shape),
                                     optional=t.name != "text_input") for t in INPUTS.values()],
            output=[kserve.ModelOutput(name=t.name, data_type=_triton_type(t.datatype), dims=list(t.shape))
                    for t in OUTPUTS.values()],
            model_transaction_policy=kserve.ModelTransactionPolicy(decoupled=True)))

    def repository_index(self, request: Any, grpc_context: Any = None) -> Any:
        """Triton's RepositoryIndex: the one model, READY or UNAVAILABLE (with `ready`, only if ready)."""
        req = self._parse(kserve.RepositoryIndexRequest, request, grpc_context)
        if req is None:
            return kserve.RepositoryIndexResponse()
        ready = self.service.ready
        if req.ready and not ready:
            return kserve.RepositoryIndexResponse()
        return kserve.RepositoryIndexResponse(models=[kserve.RepositoryIndexResponse.ModelIndex(
            name=self.model_name, version=MODEL_VERSION, state="READY" if ready else "UNAVAILABLE",
            reason="" if ready else "the server is starting or draining")])

    def model_statistics(self, request: Any, grpc_context: Any = None) -> Any:
        """Triton's ModelStatistics for this model (name "" asks for every model: this one), as
        counted by the replica answering (InferenceCounts; each replica counts its own, as each
        Triton server does behind a balancer). inference_count = execution_count = the requests
        answered in full (one prompt each; the engine batches continuously, not per request)."""
        req = self._parse(kserve.ModelStatisticsRequest, request, grpc_context)
        if req is None:
            return kserve.ModelStatisticsResponse()
        if (req.name or req.version) and not self._serves(req.name or self.model_name, req.version):
            _fail(grpc_context, grpc.StatusCode.NOT_FOUND, self._unknown(req.name or self.model_name, req.version))
            return kserve.ModelStatisticsResponse()
        c, duration = self.counts, kserve.StatisticDuration
        return kserve.ModelStatisticsResponse(model_stats=[kserve.ModelStatistics(
            name=self.model_name, version=MODEL_VERSION, last_inference=c.last_inference_ms,
            inference_count=c.success_count, execution_count=c.success_count,
            inference_stats=kserve.InferStatistics(success=duration(count=c.success_count, ns=c.success_ns),
                                                   fail=duration(count=c.fail_count, ns=c.fail_ns)))])

    # ---- inference --------------------------------------------------------------------------

    async def model_infer(self, request: Any, grpc_context: Any = None) -> Any:
        """ModelInfer: the whole completion in one response. On failure the status (and retry
        trailers) go on `grpc_context` and an empty response is returned; with no context,
        RpcAbort is raised."""
        try:
            plan = self.plan(request, streaming_rpc=False)
        except NotServed as exc:
            self.service.record_refused("ModelInfer", grpc.StatusCode.NOT_FOUND, exc.request_id)
            _fail(grpc_context, grpc.StatusCode.NOT_FOUND, str(exc))
            return kserve.ModelInferResponse()
        status = _RequestStatus(grpc_context)
        progress = _Progress()
        since = time.monotonic_ns()
        try:
            async with aclosing(self.service.generate(plan.request, status, "ModelInfer")) as chunks:
                async for chunk in chunks:
                    self._advance(progress, chunk)
        except RpcAbort:
            self.counts.record(False, since)
            _fail(grpc_context, status.code, status.details, status.trailers)
            return kserve.ModelInferResponse()
        self.counts.record(True, since)
        return self._response(plan, plan.prompt_prefix + "".join(progress.text), progress)

    async def model_stream_infer(self, requests: AsyncIterator[Any], grpc_context: Any = None
                                 ) -> AsyncIterator[Any]:
        """ModelStreamInfer: every request read from the stream runs at once, its responses
        interleaved with the others'. The stream ends once the client has sent its last request
        and every request has finished; if the client goes away, they are all cancelled."""
        out: asyncio.Queue = asyncio.Queue()
        finished, read_all = object(), object()
        pending = 0
        tasks: set[asyncio.Task] = set()

        async def serve(request: Any) -> None:
            try:
                async for response in self._stream_one(request, grpc_context):
                    out.put_nowait(response)
            except Exception:  # noqa: BLE001 - one request's bug must not end the others
                logger.exception("ModelStreamInfer request failed")
                out.put_nowait(kserve.ModelStreamInferResponse(error_message="INTERNAL: internal error"))
            finally:
                out.put_nowait(finished)

        async def read() -> None:
            nonlocal pending
            try:
                async for request in requests:
                    pending += 1
                    task = asyncio.create_task(serve(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except Exception as exc:  # noqa: BLE001 - the client's side of the stream broke
                logger.debug("ModelStreamInfer: reading requests stopped: %r", exc)
            finally:
                out.put_nowait(read_all)

        reader = asyncio.create_task(read())
        reading = True
        try:
            while reading or pending:
                item = await out.get()
                if item is read_all:
                    reading = False
                elif item is finished:
                    pending -= 1
                else:
                    yield item
        finally:
            for task in (reader, *tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _stream_one(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
        """One request of a ModelStreamInfer stream: its responses, or one in-band error."""
        wrap = kserve.ModelStreamInferResponse
        try:
            plan = self.plan(request, streaming_rpc=True)
        except NotServed as exc:
            self.service.record_refused("ModelStreamInfer", grpc.StatusCode.NOT_FOUND, exc.request_id)
            yield wrap(error_message=f"NOT_FOUND: {exc}", infer_response=self._empty(exc.request_id))
            return
        status = _RequestStatus(grpc_context)
        progress = _Progress()
        prefix = plan.prompt_prefix
        since = time.monotonic_ns()
        try:
            async with aclosing(self.service.generate(plan.request, status, "ModelStreamInfer")) as chunks:
                async for chunk in chunks:
                    self._advance(progress, chunk)
                    last = bool(progress.finish)
                    if plan.stream:
                        yield wrap(infer_response=self._response(
                            plan, prefix + chunk.text, progress, final=last and not plan.empty_final))
                        prefix = ""
        except RpcAbort:
            self.counts.record(False, since)
            yield wrap(error_message=f"{status.code_name}: {status.details}",
                       infer_response=self._empty(plan.request_id))
            return
        self.counts.record(True, since)
        if not plan.stream:
            yield wrap(infer_response=self._response(plan, prefix + "".join(progress.text), progress,
                                                     final=not plan.empty_final))
        if plan.empty_final:
            empty = self._empty(plan.request_id)
            empty.parameters[FINAL].bool_param = True
            yield wrap(infer_response=empty)

    # ---- translation ------------------------------------------------------------------------

    def plan(self, request: Any, *, streaming_rpc: bool) -> _Plan:
        """The KServe request as a GenerateRequest, and how to answer it. A request whose tensors
        do not translate gets a MalformedRequest in its place (rejected after authentication).
        Raises NotServed for another model or version."""
        if isinstance(request, (bytes, bytearray)):
            try:
                request = kserve.ModelInferRequest.FromString(bytes(request))
            except DecodeError as exc:
                return _Plan(request=MalformedRequest.undecodable("inference.ModelInferRequest", str(exc)),
                             request_id="")
        if not self._serves(request.model_name, request.model_version):
            raise NotServed(self._unknown(request.model_name, request.model_version), request.id)
        try:
            return self._translate(request, streaming_rpc)
        except InvalidRequest as exc:
            return _Plan(request=MalformedRequest(exc.field, exc.message, request.id), request_id=request.id)

    def _translate(self, request: Any, streaming_rpc: bool) -> _Plan:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidRequest("raw_input_contents", f"has {len(raw)} entries for {len(request.inputs)} inputs")
        values: dict[str, Any] = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name in values:
                raise InvalidRequest(f"inputs[{tensor.name}]", "given twice")
            values[tensor.name] = _input_value(tensor, raw[i] if raw else None)
        if "text_input" not in values:
            raise InvalidRequest("inputs[text_input]", "is required (BYTES, shape [1]: the prompt)")
        try:
            prompt = values["text_input"].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("inputs[text_input]", "is not valid UTF-8") from None
        stream = bool(values.get("stream", False))
        if stream and not streaming_rpc:
            raise InvalidRequest("inputs[stream]", "true needs the streaming RPC ModelStreamInfer; "
                                 "ModelInfer answers once")
        sampling, priority, empty_final = self._parameters(request, streaming_rpc)
        if "sampling_parameters" in values:
            for name, value in self._json_sampling(values["sampling_parameters"]).items():
                if name in sampling:
                    raise InvalidRequest(f"parameters[{name}]", "also set in sampling_parameters; set it once")
                sampling[name] = value
        exclude = values.get("exclude_input_in_output", stream)
        outputs = self._requested_outputs(request, cumulative=bool(values.get("return_cumulative_logprob", False)))
        gen = pb2.GenerateRequest(text=prompt, request_id=request.id, priority=priority,
                                  return_logprobs="cumulative_logprob" in outputs)
        for name, value in sampling.items():
            if name in ("stop", "stop_token_ids"):
                getattr(gen, name).extend(value)
            elif name == "logit_bias":
                gen.logit_bias.update(value)
            elif name == "guided":
                set_guided(gen, *value)
            else:
                setattr(gen, name, value)
        return _Plan(request=gen, request_id=request.id, stream=stream,
                     prompt_prefix="" if exclude else prompt, outputs=outputs, empty_final=empty_final)

    def _parameters(self, request: Any, streaming_rpc: bool) -> tuple[dict[str, Any], int, bool]:
        """Request parameters: (sampling fields, priority, empty final response wanted)."""
        sampling: dict[str, Any] = {}
        priority, empty_final = pb2.PRIORITY_UNSPECIFIED, False
        for key, param in request.parameters.items():
            where, value = f"parameters[{key}]", _parameter(param)
            if key in SAMPLING_FIELDS:
                sampling[key] = _typed(key, value, where)
            elif key == "priority":
                if type(value) is not int or value not in PRIORITIES:
                    raise InvalidRequest(where, f"{value!r} is not a priority; use 1 (interactive) "
                                         "or 2 (batch, shed first)")
                priority = PRIORITIES[value]
            elif key == EMPTY_FINAL:
                if not streaming_rpc or type(value) is not bool:
                    raise InvalidRequest(where, "a bool, on ModelStreamInfer only")
                empty_final = value
            elif key in _UNSUPPORTED:
                raise InvalidRequest(where, _UNSUPPORTED[key])
            else:
                raise InvalidRequest(where, f"unknown parameter; known: {sorted([*SAMPLING_FIELDS, 'priority'])}")
        return sampling, priority, empty_final

    @staticmethod
    def _json_sampling(data: bytes) -> dict[str, Any]:
        try:
            fields = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequest("inputs[sampling_parameters]", f"is not JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise InvalidRequest("inputs[sampling_parameters]", "must be a JSON object")
        out = {}
        for name, value in fields.items():
            where = f"sampling_parameters.{name}"
            if name in GUIDED_FIELDS:
                if "guided" in out:
                    raise InvalidRequest(where, f"set one of {list(GUIDED_FIELDS)}, once")
                out["guided"] = _guided(value, where)
                continue
            if name not in SAMPLING_FIELDS:
                raise InvalidRequest(where, f"unknown field; known: {sorted(SAMPLING_FIELDS)}")
            out[name] = _typed(name, value, where)
        return out

    @staticmethod
    def _requested_outputs(request: Any, cumulative: bool) -> tuple[str, ...]:
        """The outputs `outputs` names; none named: DEFAULT_OUTPUTS (+ cumulative_logprob if asked for)."""
        names = []
        for out in request.outputs:
            if out.name not in OUTPUTS:
                raise InvalidRequest(f"outputs[{out.name}]", f"unknown output; this model gives {list(OUTPUTS)}")
            if out.parameters:
                raise InvalidRequest(f"outputs[{out.name}].parameters", "output parameters (classification) "
                                     "are not supported")
            names.append(out.name)
        return tuple(names) or (*DEFAULT_OUTPUTS, *(("cumulative_logprob",) if cumulative else ()))

    # ---- responses --------------------------------------------------------------------------

    @staticmethod
    def _advance(progress: _Progress, chunk: Any) -> None:
        progress.text.append(chunk.text)
        progress.output_tokens += len(chunk.token_ids)
        progress.cumulative_logprob += sum(chunk.logprobs)
        if chunk.finish_reason:
            progress.finish = _FINISH_NAMES.get(chunk.finish_reason, "stop")
            progress.input_tokens = chunk.usage.prompt_tokens
            progress.output_tokens = chunk.usage.completion_tokens

    def _response(self, plan: _Plan, text: str, progress: _Progress, *, final: bool | None = None) -> Any:
        values = {"text_output": text, "num_output_tokens": progress.output_tokens,
                  "finish_reason": progress.finish, "num_input_tokens": progress.input_tokens,
                  "cumulative_logprob": progress.cumulative_logprob}
        response = kserve.ModelInferResponse(model_name=self.model_name, model_version=MODEL_VERSION,
                                             id=plan.request_id)
        for name in plan.outputs:
            tensor, raw = _output_tensor(name, values[name])
            response.outputs.append(tensor)
            response.raw_output_contents.append(raw)
        if final is not None:
            response.parameters[FINAL].bool_param = final
        return response

    def _empty(self, request_id: str) -> Any:
        return kserve.ModelInferResponse(model_name=self.model_name, model_version=MODEL_VERSION, id=request_id)

    # ---- helpers ------------------------------------------------------------------------------

    def _served_model(self, cls: type, request: Any, grpc_context: Any) -> bool:
        """A (name, version) request about this server's model; False with INVALID_ARGUMENT (bytes
        that do not parse) or NOT_FOUND (another model or version) set on the context."""
        req = self._parse(cls, request, grpc_context)
        if req is None:
            return False
        if not self._serves(req.name, req.version):
            _fail(grpc_context, grpc.StatusCode.NOT_FOUND, self._unknown(req.name, req.version))
            return False
        return True

    def _serves(self, name: str, version: str) -> bool:
        return name == self.model_name and version in ("", MODEL_VERSION)

    def _unknown(self, name: str, version: str) -> str:
        if name != self.model_name:
            return f"model_name: unknown model {name!r}; this server serves {self.model_name!r}"
        return f"model_version: unknown version {version!r} of {name!r}; it has {MODEL_VERSION!r}"

    @staticmethod
    def _parse(cls: type, request: Any, grpc_context: Any) -> Any:
        """A health or metadata request from bytes; None (INVALID_ARGUMENT set) if they do not parse."""
        if not isinstance(request, (bytes, bytearray)):
            return request
        try:
            return cls.FromString(bytes(request))
        except DecodeError as exc:
            _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"request: not a valid inference.{cls.__name__} ({exc})")
            return None


def _guided(value: Any, where: str) -> tuple[str, Any]:
    """vLLM's structured-output parameters -> (GuidedDecoding field, value)."""
    if not isinstance(value, dict):
        raise InvalidRequest(where, f"must be a JSON object with one of {list(_GUIDED_KINDS)}")
    kinds = [k for k in value if value[k] is not None and value[k] is not False]
    unknown = [k for k in value if k not in _GUIDED_KINDS]
    if unknown:
        raise InvalidRequest(f"{where}.{unknown[0]}", f"unknown field; known: {list(_GUIDED_KINDS)}")
    if len(kinds) != 1:
        raise InvalidRequest(where, f"set exactly one of {list(_GUIDED_KINDS)}, got {kinds}")
    kind, spec = kinds[0], value[kinds[0]]
    at = f"{where}.{kind}"
    if kind == "json":
        if isinstance(spec, dict):
            spec = json.dumps(spec)
        if not isinstance(spec, str):
            raise InvalidRequest(at, "must be a JSON schema (an object, or its text)")
        return ("json_schema", spec)
    if kind == "json_object":
        if spec is not True:
            raise InvalidRequest(at, "must be true")
        return ("json_object", True)
    if kind == "choice":
        if not (isinstance(spec, list) and spec and all(isinstance(c, str) and c for c in spec)):
            raise InvalidRequest(at, "must be a non-empty list of non-empty strings")
        return ("choice", list(spec))
    if not isinstance(spec, str):
        raise InvalidRequest(at, "must be a string")
    return (kind, spec)


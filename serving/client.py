"""Python client for the moe_serving.v1 gRPC API, and the `moe-serve generate` command.

    from serving.client import MoEClient
    with MoEClient("127.0.0.1:9000") as c:
        print(c.complete(prompt="Hello", max_tokens=8, temperature=0).text)
        for chunk in c.generate(prompt="Hello", max_tokens=8):
            print(chunk.text, end="", flush=True)

Behind Ray Serve's gRPC proxy no metadata is needed with one application; with several,
pass `application=` (sent as the `application` metadata key the proxy routes on). A cluster with
tenants (serving/api/tenants.py) wants `token=` (sent as `authorization: Bearer ...`), or without
tokens `tenant=` (sent as `x-moe-tenant`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc

from serving.api.protos import health_pb2, health_pb2_grpc, pb2, pb2_grpc, set_guided
from serving.api.tenants import AUTH_HEADER, TENANT_HEADER

__all__ = ["MoEClient", "build_request", "add_generate_arguments", "run_generate",
           "FINISH_REASONS", "EXIT_INVALID", "EXIT_RETRYABLE", "EXIT_ERROR", "EXIT_UNAUTHENTICATED"]

_PRIORITY = {"interactive": pb2.PRIORITY_INTERACTIVE, "batch": pb2.PRIORITY_BATCH,
             None: pb2.PRIORITY_UNSPECIFIED}
#: proto FinishReason value -> the name used in JSON output ("stop", "length", ...).
FINISH_REASONS = {pb2.FINISH_REASON_UNSPECIFIED: None, pb2.FINISH_REASON_STOP: "stop",
                  pb2.FINISH_REASON_LENGTH: "length", pb2.FINISH_REASON_CANCELLED: "cancelled"}

EXIT_ERROR, EXIT_INVALID, EXIT_RETRYABLE, EXIT_UNAUTHENTICATED = 1, 2, 3, 4


def call_metadata(application: str | None = None, tenant: str | None = None,
                  token: str | None = None) -> tuple[tuple[str, str], ...]:
    """A call's metadata: the Serve application it is routed to, and who the caller is
    (`x-moe-tenant` and/or `authorization: Bearer`, serving/api/tenants.py)."""
    return ((("application", application),) if application else ()) + (
        ((TENANT_HEADER, tenant),) if tenant else ()) + (((AUTH_HEADER, f"Bearer {token}"),) if token else ())


def build_request(prompt: str | None = None, prompt_ids: Sequence[int] | None = None, *,
                  messages: Sequence[tuple[str, str]] | None = None, max_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                  stop: Sequence[str] = (), priority: str | int | None = None,
                  request_id: str = "", logprobs: bool = False,
                  ignore_eos: bool = False, repetition_penalty: float | None = None,
                  presence_penalty: float = 0.0, frequency_penalty: float = 0.0, min_tokens: int = 0,
                  stop_token_ids: Sequence[int] = (), top_logprobs: int = 0,
                  logit_bias: dict[int, float] | None = None, n: int = 0,
                  guided: tuple[str, str | bool] | None = None, prompt_logprobs: int | None = None) -> Any:
    r"""A GenerateRequest. Give exactly one of prompt / prompt_ids / messages ((role, content)
    pairs: a chat, through the model's chat template); None means "server default" for the
    optional fields. priority: "interactive", "batch" or a proto value. guided: (kind, spec) of
    GuidedDecoding, e.g. ("json_schema", schema_text), ("regex", r"\d+"), ("json_object", True),
    ("choice", ["yes", "no"]). prompt_logprobs: score the prompt (k most likely at each position too)."""
    req = pb2.GenerateRequest(top_k=top_k, stop=list(stop), request_id=request_id,
                              return_logprobs=logprobs, ignore_eos=ignore_eos,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              min_tokens=min_tokens, stop_token_ids=[int(i) for i in stop_token_ids],
                              top_logprobs=top_logprobs, n=n,
                              priority=priority if isinstance(priority, int)
                              else _PRIORITY[priority])
    _set_prompt(req, prompt, prompt_ids, messages)
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if temperature is not None:
        req.temperature = temperature
    if top_p is not None:
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    if repetition_penalty is not None:
        req.repetition_penalty = repetition_penalty
    for tok, bias in (logit_bias or {}).items():
        req.logit_bias[int(tok)] = float(bias)
    if guided is not None:
        set_guided(req, *guided)
    if prompt_logprobs is not None:
        req.prompt_logprobs = prompt_logprobs
    return req


def build_tokenize_request(prompt: str | None = None, prompt_ids: Sequence[int] | None = None, *,
                           messages: Sequence[tuple[str, str]] | None = None) -> Any:
    """A TokenizeRequest: exactly one of prompt / prompt_ids / messages, as build_request's."""
    return _set_prompt(pb2.TokenizeRequest(), prompt, prompt_ids, messages)


def _set_prompt(req: Any, prompt: str | None, prompt_ids: Sequence[int] | None,
                messages: Sequence[tuple[str, str]] | None) -> Any:
    """Set the `prompt` oneof of a GenerateRequest or TokenizeRequest; returns it."""
    if sum(p is not None for p in (prompt, prompt_ids, messages)) != 1:
        raise ValueError("give exactly one of prompt, prompt_ids or messages")
    if prompt is not None:
        req.text = prompt
    elif messages is not None:
        req.chat.messages.extend(pb2.ChatMessage(role=r, content=c) for r, c in messages)
    else:
        req.token_ids.ids.extend(int(i) for i in prompt_ids)  # type: ignore[union-attr]
    return req


def continuation(request: Any, received: Sequence[int], prompt_ids: Sequence[int] | None = None) -> Any | None:
    """The request for the rest of `request` once `received` tokens came back: prompt = its
    token ids (`prompt_ids` for a text or chat prompt: what the server tokenized it to) + received,
    max_tokens and min_tokens = what is left of them, resumed_tokens = how many of the prompt's ids
    were received (so the server goes on as the undisturbed stream would: penalties, seeded
    sampling, stop strings; GenerateRequest.resumed_tokens). None if it cannot be resumed
    (`resumable`; a text or chat prompt without `prompt_ids`) or nothing is left."""
    if not resumable(request, received):
        return None
    if request.WhichOneof("prompt") == "token_ids":
        prompt_ids = request.token_ids.ids
    elif prompt_ids is None:
        return None
    rest = pb2.GenerateRequest()
    rest.CopyFrom(request)
    rest.token_ids.ids[:] = [int(t) for t in prompt_ids] + [int(t) for t in received]   # the prompt oneof: ids now
    rest.max_tokens = request.max_tokens - len(received)
    rest.min_tokens = max(0, request.min_tokens - len(received))
    rest.resumed_tokens = len(received)
    if received:                   # the prompt's logprobs came with the first token: not again
        rest.ClearField("prompt_logprobs")
    return rest


def resumable(request: Any, received: Sequence[int]) -> bool:
    """Whether the rest of `request` can be asked for after `received` tokens: max_tokens set and
    not reached, one completion, no guided decoding (its grammar would start over)."""
    return (request.HasField("max_tokens") and request.n <= 1 and not request.HasField("guided")
            and request.max_tokens - len(received) >= 1)


def _tokenize_request_of(request: Any) -> Any:
    """The TokenizeRequest of a GenerateRequest's text or chat prompt."""
    out = pb2.TokenizeRequest()
    if request.WhichOneof("prompt") == "text":
        out.text = request.text
    else:
        out.chat.CopyFrom(request.chat)
    return out


def _retry_after_s(details: str) -> float:
    """The delay a status asks for ("... retry after 1000 ms"), else 1 s."""
    m = re.search(r"retry after (\d+) ms", details)
    return int(m.group(1)) / 1000 if m else 1.0


#: What `generate(resume=N)` goes on after. UNAVAILABLE: the replica serving the stream died (Ray's
#: proxy says so, serving/api/proxy_status.py) or was draining. CANCELLED: this client did not cancel
#: (leaving the loop early is not an RpcError), so something on the way reset the stream; HAProxy does
#: when the replica behind it dies (`moe-serve up --grpc-ingress haproxy`).
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class MoEClient:
    """A blocking client over one insecure channel (use as a context manager, or close())."""

    def __init__(self, target: str, timeout_s: float | None = 120.0, *,
                 application: str | None = None,
                 tenant: str | None = None, token: str | None = None,
                 metadata: Sequence[tuple[str, str]] = (),
                 options: Sequence[tuple[str, Any]] = ()):
        """`token`: the bearer token of a cluster with tenant auth (serving/api/tenants.py);
        `tenant`: the caller's name where the cluster runs without tokens (`x-moe-tenant`)."""
        self.target = target
        self.timeout_s = timeout_s
        self.metadata = tuple(metadata) + call_metadata(application, tenant, token)
        self.channel = grpc.insecure_channel(target, options=list(options))
        self._stub = pb2_grpc.MoEServingStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _req(self, request: Any, kwargs: dict[str, Any], build: Callable[..., Any] = build_request) -> Any:
        if request is not None and kwargs:
            raise TypeError(f"pass a request or {build.__name__}() arguments, not both")
        return request if request is not None else build(**kwargs)

    def generate(self, request: Any = None, *, timeout_s: float | None = None, resume: int = 0,
                 **kwargs: Any) -> Iterator[Any]:
        """Stream GenerateResponse chunks. Raises grpc.RpcError on a non-OK status.

        resume: how many times to go on after UNAVAILABLE (the replica serving the stream died,
        or was draining) or a stream reset by the server's side (CANCELLED; see _RESUMABLE), each
        after the delay the status asks for (at most 5 s; 1 s if it names none). The rest is
        asked for as a new request whose prompt is the prompt's ids plus the tokens already
        received, with max_tokens what is left and resumed_tokens how many were received
        (`continuation`), so the stream carries on where it stopped: greedy decoding, and seeded
        sampling, give exactly the tokens of an undisturbed run (penalties and stop strings as
        well); unseeded sampling goes on with fresh randomness. A text or chat prompt's ids are
        asked for once (Tokenize) when the first break comes. Needs max_tokens set, one completion
        and no guided decoding (`resumable`).
        The rest comes from whatever the endpoint serves then (after a `redeploy`, the new model).
        The last chunk's usage counts as one request: the prompt's tokens, and all generated.

        Breaking out of the loop early cancels the RPC."""
        original = self._req(request, kwargs)
        received: list[int] = []
        prompt_ids = None            # a text or chat prompt's ids (Tokenize), once a resume needs them
        for attempt in range(resume + 1):
            before = len(received)       # tokens the continuation's prompt holds
            call = None
            try:
                req = original
                if received:             # ask for the rest
                    if original.WhichOneof("prompt") != "token_ids" and prompt_ids is None:
                        prompt_ids = list(self.tokenize(_tokenize_request_of(original), timeout_s=timeout_s).token_ids)
                    req = continuation(original, received, prompt_ids)
                call = self._stub.Generate(req, timeout=timeout_s or self.timeout_s, metadata=self.metadata or None)
                for chunk in call:
                    received.extend(chunk.token_ids)
                    if before and chunk.HasField("usage"):
                        chunk.usage.prompt_tokens -= before
                        chunk.usage.completion_tokens += before
                        chunk.usage.cached_prompt_tokens = min(chunk.usage.cached_prompt_tokens,
                                                               chunk.usage.prompt_tokens)
                    yield chunk
                return
            except grpc.RpcError as err:
                if (attempt == resume or err.code() not in _RESUMABLE
                        or (received and not resumable(original, received))):
                    raise
                time.sleep(min(5.0, _retry_after_s(err.details() or "")))
            finally:
                if call is not None:
                    call.cancel()       # no-op once the stream has finished

    def complete(self, request: Any = None, *, timeout_s: float | None = None,
                 **kwargs: Any) -> Any:
        """One CompleteResponse. Raises grpc.RpcError on a non-OK status."""
        return self._stub.Complete(self._req(request, kwargs),
                                   timeout=timeout_s or self.timeout_s,
                                   metadata=self.metadata or None)

    def tokenize(self, request: Any = None, *, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """The TokenizeResponse of a TokenizeRequest (or build_tokenize_request() arguments): the
        prompt's token ids as Generate runs them, max_model_len, max_tokens_limit. Raises grpc.RpcError."""
        return self._stub.Tokenize(self._req(request, kwargs, build_tokenize_request),
                                   timeout=timeout_s or self.timeout_s, metadata=self.metadata or None)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """grpc.health.v1 status name: "SERVING", "NOT_SERVING", ... Raises grpc.RpcError."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=timeout_s or self.timeout_s,
                                  metadata=self.metadata or None)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "MoEClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- CLI: moe-serve generate -------------------------------------------------------

def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `moe-serve generate` (the lead wires this into serving/cli.py)."""
    add_prompt_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens to generate (server default: 16)")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", nargs="+", default=[], metavar="S", help="stop strings")
    parser.add_argument("--priority", choices=["interactive", "batch"], default=None)
    parser.add_argument("--request-id", default="")
    parser.add_argument("--logprobs", action="store_true", help="return token logprobs")
    parser.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                        help="with --logprobs: also the K most likely tokens at each position (JSON: top_logprobs)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--prompt-logprobs", type=int, default=None, metavar="K",
                        help="score the prompt: each prompt token's logprob after the first (JSON: prompt_logprobs), "
                             "and with K > 0 the K most likely at each position (prompt_top_logprobs)")
    parser.add_argument("--n", type=int, default=0, metavar="N",
                        help="N completions of the prompt, each sampled on its own (seed + i with --seed); JSON: "
                             "completion 0's fields plus `completions`, text: one line each")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1 = off)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2] (0 = off)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2] (0 = off)")
    parser.add_argument("--min-tokens", type=int, default=0, help="no stop before this many tokens")
    parser.add_argument("--stop-token-ids", default=None, metavar="IDS",
                        help="also stop after these token ids, comma-separated: 2,13")
    parser.add_argument("--logit-bias", nargs="+", default=[], metavar="ID=BIAS",
                        help="add BIAS (in [-100, 100]) to token ID's logit: 13=-100 bans it")
    guided = parser.add_mutually_exclusive_group()
    guided.add_argument("--json-schema", metavar="SCHEMA",
                        help="guided decoding: the completion is JSON valid against this JSON Schema (its text, "
                             "or @FILE)")
    guided.add_argument("--json-object", action="store_true", help="guided decoding: the completion is a JSON object")
    guided.add_argument("--regex", metavar="PATTERN", help="guided decoding: the whole completion matches PATTERN")
    guided.add_argument("--choice", nargs="+", metavar="S",
                        help="guided decoding: the completion is exactly one of these strings")
    guided.add_argument("--grammar", metavar="EBNF",
                        help="guided decoding: the completion matches this EBNF grammar's `root` rule (text, or @FILE)")
    parser.add_argument("--stream", action="store_true",
                        help="print text deltas as they arrive")
    parser.add_argument("--resume", type=int, default=0, metavar="N",
                        help="--stream with --max-tokens: go on after UNAVAILABLE "
                             "(the serving replica was lost) or a stream the server's side reset "
                             "(CANCELLED) up to N times (MoEClient.generate)")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object with the result")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--application", default=None,
                        help="Ray Serve application name (only with several apps)")
    add_caller_arguments(parser)


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """--target and the prompt (one of --prompt, --prompt-ids, --message): generate and tokenize."""
    parser.add_argument("--target", required=True, help="HOST:PORT of the gRPC endpoint")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text")
    group.add_argument("--prompt-ids", help="prompt token ids, comma-separated: 1,2,3")
    group.add_argument("--message", nargs=2, action="append", metavar=("ROLE", "TEXT"),
                       help="a chat turn (system | user | assistant), repeatable, in order: the prompt is the "
                            "conversation through the model's chat template")


def _prompt_fields(args: argparse.Namespace) -> dict[str, Any]:
    """add_prompt_arguments' flags as build_request / build_tokenize_request arguments."""
    return {"prompt": args.prompt,
            "prompt_ids": _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None,
            "messages": [tuple(m) for m in args.message] if args.message else None}


def _report_rpc_error(e: grpc.RpcError) -> int:
    """Print "error: CODE: details" to stderr; the exit code for it."""
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    print(f"error: {code.name if code is not None else 'UNKNOWN'}: {details}", file=sys.stderr)
    return _exit_code(code)


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `moe-serve tokenize`."""
    add_prompt_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: token_ids, count, max_model_len, max_tokens_limit")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--application", default=None, help="Ray Serve application name (only with several apps)")
    add_caller_arguments(parser)


def run_tokenize(args: argparse.Namespace) -> int:
    """Run `moe-serve tokenize`; returns the exit code (as run_generate's)."""
    try:
        request = build_tokenize_request(**_prompt_fields(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    with MoEClient(args.target, args.timeout_s, application=args.application, tenant=args.tenant,
                   token=caller_token(args)) as client:
        try:
            resp = client.tokenize(request)
        except grpc.RpcError as e:
            return _report_rpc_error(e)
    ids = list(resp.token_ids)
    if args.json:
        print(json.dumps({"token_ids": ids, "count": len(ids), "max_model_len": resp.max_model_len,
                          "max_tokens_limit": resp.max_tokens_limit}))
    else:
        print(f"{len(ids)} tokens (max_model_len {resp.max_model_len}, max_tokens_limit {resp.max_tokens_limit}): "
              + ",".join(map(str, ids)))
    return 0


def add_caller_arguments(parser: argparse.ArgumentParser) -> None:
    """--tenant and --token-env: who the caller is (serving/api/tenants.py); generate, bench, loadtest."""
    parser.add_argument("--tenant", default=None,
                        help="caller's tenant name (x-moe-tenant), where the cluster runs without tokens")
    parser.add_argument("--token-env", default="MOE_SERVE_TOKEN", metavar="VAR",
                        help="environment variable holding the bearer token, if the cluster requires one "
                             "(default MOE_SERVE_TOKEN; read from the environment so it stays out of `ps`)")


def caller_token(args: argparse.Namespace) -> str | None:
    return os.environ.get(args.token_env) or None


def _parse_ids(text: str, flag: str = "--prompt-ids") -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError(f"{flag} is empty")
    return ids


def _parse_bias(items: Sequence[str]) -> dict[int, float]:
    out = {}
    for item in items:
        tok, sep, bias = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(tok)] = float(bias)
        except ValueError:
            raise ValueError(f"--logit-bias takes ID=BIAS pairs (13=-100), got {item!r}") from None
    return out


def _guided(args: argparse.Namespace) -> tuple[str, str | bool] | None:
    """--json-schema / --json-object / --regex / --grammar as GuidedDecoding's (kind, value); a
    value starting with @ names a file to read it from."""
    if args.json_object:
        return ("json_object", True)
    if args.choice:
        return ("choice", list(args.choice))
    for kind in ("json_schema", "regex", "grammar"):
        value = getattr(args, kind)
        if value is not None:
            if value.startswith("@"):
                try:
                    value = Path(value[1:]).read_text()
                except OSError as exc:
                    raise ValueError(f"--{kind.replace('_', '-')}: cannot read {value[1:]}: {exc.strerror}") from None
            return (kind, value)
    return None


def _exit_code(code: grpc.StatusCode | None) -> int:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return EXIT_INVALID
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return EXIT_UNAUTHENTICATED
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        return EXIT_RETRYABLE
    return EXIT_ERROR


def run_generate(args: argparse.Namespace) -> int:
    """Run `moe-serve generate`; returns the exit code (0 ok, 2 invalid, 3 retryable, 1)."""
    try:
        request = build_request(
            **_prompt_fields(args),
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop=args.stop, priority=args.priority,
            request_id=args.request_id, logprobs=args.logprobs, ignore_eos=args.ignore_eos,
            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens,
            stop_token_ids=_parse_ids(args.stop_token_ids, "--stop-token-ids") if args.stop_token_ids else (),
            top_logprobs=args.top_logprobs, logit_bias=_parse_bias(args.logit_bias), n=args.n,
            guided=_guided(args), prompt_logprobs=args.prompt_logprobs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID

    results: dict[int, dict[str, Any]] = {}       # completion index -> its JSON result
    live = args.stream and not args.json and args.n <= 1    # n > 1: printed once all are done
    with MoEClient(args.target, args.timeout_s, application=args.application, tenant=args.tenant,
                   token=caller_token(args)) as client:
        try:
            if args.stream:
                for chunk in client.generate(request, resume=args.resume):
                    _merge(results, chunk.index, chunk)
                    if live and chunk.text:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                if live:
                    sys.stdout.write("\n")
            else:
                done = client.complete(request)
                for i, c in enumerate(done.completions or [done]):     # completions come in index order
                    _merge(results, i, c)
                if done.completions:                                    # the prompt's, beside them
                    _merge_prompt(results[0], done)
                results.setdefault(0, _empty_result())["request_id"] = done.request_id
        except grpc.RpcError as e:
            if args.stream and not args.json:
                sys.stdout.write("\n")
            return _report_rpc_error(e)
    for i, r in results.items():
        prompt_lp, prompt_top = r.pop("prompt_logprobs"), r.pop("prompt_top_logprobs")
        if args.prompt_logprobs is not None and i == 0:
            r["prompt_logprobs"] = prompt_lp
            if args.prompt_logprobs:
                r["prompt_top_logprobs"] = prompt_top
        logprobs, top = r.pop("logprobs"), r.pop("top_logprobs")
        if args.logprobs:
            r["logprobs"] = logprobs
        if args.top_logprobs:
            r["top_logprobs"] = top
    result = dict(results.get(0) or _empty_result())
    if len(results) > 1:         # n > 1: completion 0's fields, every completion, usage over all
        result["completions"] = [{"index": i, **{k: v for k, v in results[i].items() if k != "request_id"}}
                                 for i in sorted(results)]
        result["usage"] = {**result["usage"], "completion_tokens": sum(
            r["usage"]["completion_tokens"] for r in results.values())}
    if args.json:
        print(json.dumps(result))
    elif len(results) > 1:
        for i in sorted(results):
            print(f"[{i}] {results[i]['text']}")
    elif not args.stream:
        print(result["text"])
    return 0


def _empty_result() -> dict[str, Any]:
    return {"request_id": "", "token_ids": [], "text": "", "finish_reason": None,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cached_prompt_tokens": 0},
            "logprobs": [], "top_logprobs": [], "prompt_logprobs": [], "prompt_top_logprobs": []}


def _merge(results: dict[int, dict[str, Any]], index: int, msg: Any) -> None:
    """Fold a GenerateResponse chunk, a CompleteResponse or a Completion into completion `index`'s result."""
    result = results.setdefault(index, _empty_result())
    result["request_id"] = getattr(msg, "request_id", "") or result["request_id"]
    result["text"] += msg.text
    result["token_ids"].extend(msg.token_ids)
    result["logprobs"].extend(msg.logprobs)
    result["top_logprobs"].extend(_top(msg.top_logprobs))
    _merge_prompt(result, msg)
    if msg.finish_reason:
        result["finish_reason"] = FINISH_REASONS.get(msg.finish_reason, "unknown")
        result["usage"] = {"prompt_tokens": msg.usage.prompt_tokens,
                           "completion_tokens": msg.usage.completion_tokens,
                           "cached_prompt_tokens": msg.usage.cached_prompt_tokens}


def _top(positions: Any) -> list[list[dict[str, Any]]]:
    return [[{"token_id": t, "logprob": lp} for t, lp in zip(pos.token_ids, pos.logprobs)] for pos in positions]


def _merge_prompt(result: dict[str, Any], msg: Any) -> None:
    """The prompt's logprobs of a GenerateResponse or CompleteResponse (a Completion has none)."""
    result["prompt_logprobs"].extend(getattr(msg, "prompt_logprobs", ()))
    result["prompt_top_logprobs"].extend(_top(getattr(msg, "prompt_top_logprobs", ())))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m serving.client ...`), same as `moe-serve generate`."""
    parser = argparse.ArgumentParser(prog="moe-serve generate")
    add_generate_arguments(parser)
    return run_generate(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

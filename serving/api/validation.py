"""GenerateRequest (proto) -> GenerationRequest (engine), rejecting anything malformed.

Every rejection is an `InvalidRequest(field, message)` whose text starts with the proto
field name, so the client's INVALID_ARGUMENT details say exactly what to fix.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from serving.api.errors import InvalidRequest, MalformedRequest
from serving.engine.request import GenerationRequest, Priority
from serving.model.guided import Guide, check_guide, choice_regex
from serving.model.sampling import SamplingParams

__all__ = ["ApiLimits", "InvalidRequest", "Tokenizer", "validate_request", "new_request_id", "num_completions"]

_PRIORITIES = {0: Priority.INTERACTIVE, 1: Priority.INTERACTIVE, 2: Priority.BATCH}


class Tokenizer(Protocol):
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class ApiLimits:
    """What one request may ask for. Built from the model config plus operator caps."""
    vocab_size: int                    # token ids must lie in [0, vocab_size)
    max_model_len: int                 # prompt tokens + max_tokens must fit
    max_tokens_limit: int = 4096       # cap on max_tokens
    default_max_tokens: int = 16       # when max_tokens is unset (capped by room left)
    max_prompt_chars: int = 1 << 20    # text prompts (a chat's contents together) longer than this are not tokenized
    max_chat_messages: int = 1024
    max_stop_strings: int = 8
    max_stop_chars: int = 128          # per stop string
    max_stop_token_ids: int = 64
    max_top_logprobs: int = 20
    max_logit_bias: int = 300          # entries (OpenAI's cap)
    max_request_id_chars: int = 128
    max_n: int = 16                    # completions per request
    max_guide_chars: int = 1 << 16     # a guided request's schema / regex / grammar (a choice: as its regex)
    max_guide_choices: int = 1024      # guided.choice strings

    def __post_init__(self) -> None:
        if self.vocab_size <= 0 or self.max_model_len <= 0 or self.max_tokens_limit <= 0:
            raise ValueError(f"ApiLimits must be positive: {self}")

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> "ApiLimits":
        """From a `MoEConfig` (vocab_size, max_position_embeddings); overrides win."""
        kw: dict[str, Any] = {"vocab_size": config.vocab_size,
                              "max_model_len": config.max_position_embeddings}
        kw.update(overrides)
        kw.setdefault("max_tokens_limit", min(4096, kw["max_model_len"]))
        return cls(**kw)


def new_request_id() -> str:
    return uuid.uuid4().hex


def _validate_request_id(rid: str, limits: ApiLimits) -> str:
    if not rid:
        return new_request_id()
    if len(rid) > limits.max_request_id_chars:
        raise InvalidRequest("request_id", f"has {len(rid)} characters; at most "
                             f"{limits.max_request_id_chars} are allowed")
    if not all("\x21" <= ch <= "\x7e" for ch in rid):
        raise InvalidRequest("request_id", "must be printable ASCII without spaces")
    return rid


def _check_in_vocab(field: str, ids: tuple[int, ...], limits: ApiLimits) -> None:
    for pos, tok in enumerate(ids):
        if not 0 <= tok < limits.vocab_size:
            raise InvalidRequest(field, f"id {tok} at position {pos} is outside the vocabulary [0, {limits.vocab_size})")


def _prompt_ids(req: Any, limits: ApiLimits, tokenizer: Tokenizer) -> tuple[int, ...]:
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("prompt", "is required: set text, token_ids or chat")
    if kind == "chat":
        return _chat_ids(req.chat, limits, tokenizer)
    if kind == "text":
        text = req.text
        if not text:
            raise InvalidRequest("prompt", "text is empty")
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequest("prompt", f"text has {len(text)} characters; at most "
                                 f"{limits.max_prompt_chars} are allowed")
        ids = tuple(int(i) for i in tokenizer.encode(text, add_bos=True))
        if not ids:
            raise InvalidRequest("prompt", "text encodes to no tokens")
        return ids
    ids = tuple(req.token_ids.ids)
    if not ids:
        raise InvalidRequest("prompt", "token_ids is empty")
    _check_in_vocab("prompt.token_ids", ids, limits)
    return ids


def prompt_token_ids(req: Any, limits: ApiLimits, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The token ids of a request's `prompt` oneof (GenerateRequest's, TokenizeRequest's), as
    Generate runs them; InvalidRequest naming the field if it has none, or one that does not
    tokenize (or `req` is a MalformedRequest). Its length against the context is not checked here."""
    if isinstance(req, MalformedRequest):
        raise InvalidRequest(req.field, req.message)
    return _prompt_ids(req, limits, tokenizer)


def _max_tokens(req: Any, prompt_len: int, limits: ApiLimits) -> int:
    room = limits.max_model_len - prompt_len
    if room <= 0:
        raise InvalidRequest("prompt", f"has {prompt_len} tokens; the model's context "
                             f"length max_model_len is {limits.max_model_len}")
    if not req.HasField("max_tokens"):
        return min(limits.default_max_tokens, limits.max_tokens_limit, room)
    n = req.max_tokens
    if n <= 0:
        raise InvalidRequest("max_tokens", f"{n} must be >= 1 (leave it unset for the "
                             f"default {limits.default_max_tokens})")
    if n > limits.max_tokens_limit:
        raise InvalidRequest("max_tokens", f"{n} exceeds the limit {limits.max_tokens_limit}")
    if n > room:
        raise InvalidRequest("max_tokens", f"prompt tokens ({prompt_len}) + max_tokens ({n}) "
                             f"= {prompt_len + n} exceeds max_model_len {limits.max_model_len}")
    return n


def _sampling_fields(req: Any, limits: ApiLimits) -> dict[str, Any]:
    """SamplingParams fields except max_tokens (which depends on the prompt)."""
    temperature = 1.0
    if req.HasField("temperature"):
        temperature = req.temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidRequest("temperature", f"{temperature} must be a finite number >= 0")
    top_p = 1.0
    if req.HasField("top_p"):
        top_p = req.top_p
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise InvalidRequest("top_p", f"{top_p} must be in (0, 1]")
    if req.top_k < 0:
        raise InvalidRequest("top_k", f"{req.top_k} must be >= 0 (0 disables top-k)")
    seed = None
    if req.HasField("seed"):
        if req.seed < 0:
            raise InvalidRequest("seed", f"{req.seed} must be >= 0")
        seed = int(req.seed)
    stop = tuple(req.stop)
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest("stop", f"has {len(stop)} strings; at most "
                             f"{limits.max_stop_strings} are allowed")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequest("stop", f"string {i} is empty")
        if len(s) > limits.max_stop_chars:
            raise InvalidRequest("stop", f"string {i} has {len(s)} characters; at most "
                                 f"{limits.max_stop_chars} are allowed")
    return dict(temperature=float(temperature), top_p=float(top_p), top_k=int(req.top_k),
                seed=seed, stop=stop, logprobs=bool(req.return_logprobs),
                ignore_eos=bool(req.ignore_eos), **_penalty_fields(req, limits))


def _penalty_fields(req: Any, limits: ApiLimits) -> dict[str, Any]:
    """The fields that adjust the logits or end generation by token (penalties, logit_bias,
    min_tokens, stop_token_ids), top_logprobs and prompt_logprobs."""
    repetition = 1.0
    if req.HasField("repetition_penalty"):
        repetition = req.repetition_penalty
        if not (math.isfinite(repetition) and 0.0 < repetition <= 10.0):
            raise InvalidRequest("repetition_penalty", f"{repetition} must be in (0, 10] (1 = off)")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if not (math.isfinite(value) and -2.0 <= value <= 2.0):
            raise InvalidRequest(name, f"{value} must be in [-2, 2] (0 = off)")
    if req.min_tokens < 0:
        raise InvalidRequest("min_tokens", f"{req.min_tokens} must be >= 0 (0 = off)")
    ids = tuple(req.stop_token_ids)
    if len(ids) > limits.max_stop_token_ids:
        raise InvalidRequest("stop_token_ids", f"has {len(ids)} ids; at most {limits.max_stop_token_ids} "
                             "are allowed")
    _check_in_vocab("stop_token_ids", ids, limits)
    if not 0 <= req.top_logprobs <= limits.max_top_logprobs:
        raise InvalidRequest("top_logprobs", f"{req.top_logprobs} must be in [0, {limits.max_top_logprobs}]")
    if req.top_logprobs and not req.return_logprobs:
        raise InvalidRequest("top_logprobs", "needs return_logprobs")
    prompt_logprobs = None
    if req.HasField("prompt_logprobs"):
        prompt_logprobs = int(req.prompt_logprobs)
        if not 0 <= prompt_logprobs <= limits.max_top_logprobs:
            raise InvalidRequest("prompt_logprobs", f"{prompt_logprobs} must be in [0, {limits.max_top_logprobs}]")
    bias = dict(req.logit_bias)
    if len(bias) > limits.max_logit_bias:
        raise InvalidRequest("logit_bias", f"has {len(bias)} entries; at most {limits.max_logit_bias} are allowed")
    for tok, value in sorted(bias.items()):
        if not 0 <= tok < limits.vocab_size:
            raise InvalidRequest(f"logit_bias[{tok}]", f"token id outside the vocabulary [0, {limits.vocab_size})")
        if not (math.isfinite(value) and -100.0 <= value <= 100.0):
            raise InvalidRequest(f"logit_bias[{tok}]", f"{value} must be in [-100, 100]")
    return dict(repetition_penalty=float(repetition), presence_penalty=float(req.presence_penalty),
                frequency_penalty=float(req.frequency_penalty), min_tokens=int(req.min_tokens),
                stop_token_ids=ids, top_logprobs=int(req.top_logprobs), prompt_logprobs=prompt_logprobs,
                logit_bias=tuple((int(t), float(v)) for t, v in sorted(bias.items())))


CHAT_ROLES = ("system", "user", "assistant")


def _chat_ids(chat: Any, limits: ApiLimits, tokenizer: Tokenizer) -> tuple[int, ...]:
    """A conversation through the model's chat template (serving/model/chat_template.py)."""
    from serving.model.chat_template import ChatTemplateError
    messages = list(chat.messages)
    if not messages:
        raise InvalidRequest("prompt.chat.messages", "is empty")
    if len(messages) > limits.max_chat_messages:
        raise InvalidRequest("prompt.chat.messages", f"has {len(messages)} messages; at most "
                             f"{limits.max_chat_messages} are allowed")
    chars = 0
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"prompt.chat.messages[{i}].role", f"{m.role!r} is not one of {list(CHAT_ROLES)}")
        chars += len(m.content)
    if chars > limits.max_prompt_chars:
        raise InvalidRequest("prompt.chat.messages", f"hold {chars} characters; at most "
                             f"{limits.max_prompt_chars} are allowed")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequest("prompt.chat", "this model has no chat template (tokenizer_config.json "
                             "chat_template); send text or token_ids")
    try:
        ids = tuple(int(i) for i in tokenizer.encode_chat([{"role": m.role, "content": m.content}
                                                          for m in messages]))
    except ChatTemplateError as exc:
        raise InvalidRequest("prompt.chat.messages", f"the model's chat template refused them: {exc}") from None
    if not ids:
        raise InvalidRequest("prompt.chat", "renders to no tokens")
    return ids


API_GUIDE_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")   # GuidedDecoding's oneof


def _guide(req: Any, limits: ApiLimits) -> Guide | None:
    """The request's `guided` spec, parsed (not yet compiled against the vocabulary), or None."""
    if not req.HasField("guided"):
        return None
    kind = req.guided.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("guided", f"set one of {', '.join(API_GUIDE_KINDS)}")
    field = f"guided.{kind}"
    if kind == "json_object":
        if not req.guided.json_object:
            raise InvalidRequest(field, "must be true when set")
        guide = Guide(kind)
    elif kind == "choice":
        choices = list(req.guided.choice.choices)
        if not choices or not all(choices):
            raise InvalidRequest(field, "needs at least one string, none of them empty")
        if len(choices) > limits.max_guide_choices:
            raise InvalidRequest(field, f"has {len(choices)} strings; at most {limits.max_guide_choices} are allowed")
        guide = Guide("regex", choice_regex(choices))
        if len(guide.spec) > limits.max_guide_chars:
            raise InvalidRequest(field, f"is {len(guide.spec)} characters as a pattern; at most "
                                 f"{limits.max_guide_chars} are allowed")
    else:
        spec = getattr(req.guided, kind)
        if not spec.strip():
            raise InvalidRequest(field, "is empty")
        if len(spec) > limits.max_guide_chars:
            raise InvalidRequest(field, f"has {len(spec)} characters; at most {limits.max_guide_chars} are allowed")
        guide = Guide(kind, spec)
    for name in ("ignore_eos", "min_tokens"):
        if getattr(req, name):
            raise InvalidRequest("guided", f"cannot be combined with {name} (a guided completion ends where "
                                 "its spec allows end of sequence)")
    try:
        check_guide(guide)
    except ValueError as exc:
        raise InvalidRequest(field, str(exc)) from None
    return guide


def num_completions(req: Any, limits: ApiLimits) -> int:
    """How many completions `req` asks for (its `n`; 0 means 1)."""
    n = int(getattr(req, "n", 0))            # a KServe face's MalformedRequest has none
    if not 0 <= n <= limits.max_n:
        raise InvalidRequest("n", f"{n} must be in [0, {limits.max_n}] (0 means 1)")
    return max(n, 1)


def validate_request(req: Any, limits: ApiLimits, tokenizer: Tokenizer, *,
                     arrival_time: float | None = None) -> GenerationRequest:
    """Check a `moe_serving.v1.GenerateRequest` and convert it for the engine.

    Raises InvalidRequest (field, message) for anything the client must fix. Cheap checks
    run first, so a bad request is rejected before its prompt is tokenized.
    """
    if isinstance(req, MalformedRequest):
        raise InvalidRequest(req.field, req.message)
    request_id = _validate_request_id(req.request_id, limits)
    num_completions(req, limits)
    if int(req.priority) not in _PRIORITIES:
        raise InvalidRequest("priority", f"unknown value {int(req.priority)}; use "
                             "PRIORITY_INTERACTIVE or PRIORITY_BATCH")
    priority = _PRIORITIES[int(req.priority)]
    sampling = _sampling_fields(req, limits)       # before tokenizing the prompt
    sampling["guide"] = _guide(req, limits)
    prompt = _prompt_ids(req, limits, tokenizer)
    max_tokens = _max_tokens(req, len(prompt), limits)
    if sampling["min_tokens"] > max_tokens:
        raise InvalidRequest("min_tokens", f"{sampling['min_tokens']} exceeds max_tokens ({max_tokens})")
    return GenerationRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
        priority=priority,
        arrival_time=time.time() if arrival_time is None else arrival_time,
        resumed_tokens=_resumed_tokens(req, len(prompt), sampling["guide"] is not None),
    )


def _resumed_tokens(req: Any, prompt_len: int, guided: bool) -> int:
    """GenerateRequest.resumed_tokens: fewer than the prompt's tokens; not with n > 1 or guided
    decoding (a grammar's state is not resumed)."""
    r = int(getattr(req, "resumed_tokens", 0))
    if r == 0:
        return 0
    if not 0 < r < prompt_len:
        raise InvalidRequest("resumed_tokens", f"{r} must be in [0, {prompt_len}) (the prompt's "
                             f"{prompt_len} tokens end with the resumed output)")
    if int(req.n) > 1:
        raise InvalidRequest("resumed_tokens", "cannot be combined with n > 1")
    if guided:
        raise InvalidRequest("resumed_tokens", "cannot be combined with guided decoding (its grammar's "
                             "state is not resumed)")
    return r

"""What flows between the API layer and the engine: plain, picklable dataclasses."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from serving.model.sampling import SamplingParams, TopLogprobs


class Priority(enum.IntEnum):
    INTERACTIVE = 0   # shed last
    BATCH = 1         # shed first


class FinishReason(str, enum.Enum):
    STOP = "stop"           # EOS token or a stop string
    LENGTH = "length"       # max_tokens reached
    CANCELLED = "cancelled" # the client went away


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: Priority = Priority.INTERACTIVE
    arrival_time: float = 0.0          # time.time() at the ingress
    cache_salt: str = ""               # prefix-cache namespace: only requests with the same salt share
                                       # cached K/V (the API sets the caller's tenant)
    resumed_tokens: int = 0            # the prompt's last ids are this many of its own output from an
                                       # earlier attempt (a resumed stream): penalties, seeded sampling,
                                       # stop strings and detokenization go on from them


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenEvent:
    """One engine step's output for one request (streamed back to the ingress)."""
    request_id: str
    token_id: int
    text_delta: str
    logprob: float | None = None
    finish_reason: FinishReason | None = None   # set on the last event only
    prompt_tokens: int = 0
    completion_tokens: int = 0                  # generated so far, this token included
    cached_tokens: int = 0                      # prompt tokens found in the prefix cache at the start
    top_logprobs: TopLogprobs | None = None     # (ids, logprobs), most likely first
    # on the first event of a request with prompt_logprobs: prompt tokens 1..n-1's logprobs, each
    # given the tokens before it (token 0 has none), and with k > 0 the k most likely at each position
    prompt_logprobs: tuple[float, ...] | None = None
    prompt_top_logprobs: tuple[TopLogprobs, ...] | None = None

"""validate_request: every invalid input names its field; valid ones convert faithfully."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from serving.api.errors import InvalidRequest
from serving.api.local_server import ByteTokenizer
from serving.api.protos import pb2
from serving.api.validation import ApiLimits, validate_request
from serving.client import build_request
from serving.engine.request import Priority

TOK = ByteTokenizer()                      # "ab" -> [0, 98, 99]
LIMITS = ApiLimits(vocab_size=TOK.vocab_size, max_model_len=32, max_tokens_limit=20,
                   max_stop_strings=2, max_stop_chars=8, max_request_id_chars=16,
                   max_prompt_chars=100)


def check(req, limits=LIMITS):
    return validate_request(req, limits, TOK)


def invalid(req, field, *needles, limits=LIMITS) -> str:
    with pytest.raises(InvalidRequest) as ei:
        check(req, limits)
    assert ei.value.field == field
    msg = str(ei.value)
    assert msg.startswith(f"{field}:"), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---- valid conversions ---------------------------------------------------------------

def test_defaults_from_text_prompt():
    g = check(build_request("ab"))
    assert g.prompt_token_ids == (0, 98, 99)           # BOS + bytes
    s = g.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (16, 1.0, 1.0, 0, None)
    assert s.stop == () and not s.logprobs and not s.ignore_eos
    assert g.priority is Priority.INTERACTIVE
    assert len(g.request_id) == 32 and g.arrival_time > 0


def test_all_fields_convert():
    g = check(build_request(prompt_ids=[5, 6, 7], max_tokens=20, temperature=0.0, top_p=0.5,
                            top_k=3, seed=123, stop=["x", "yz"], priority="batch",
                            request_id="my-req.1", logprobs=True, ignore_eos=True))
    assert g.prompt_token_ids == (5, 6, 7)               # ids are used verbatim, no BOS
    assert g.request_id == "my-req.1" and g.priority is Priority.BATCH
    s = g.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (20, 0.0, 0.5, 3, 123)
    assert s.stop == ("x", "yz") and s.logprobs and s.ignore_eos


def test_penalties_and_stops_convert():
    s = check(build_request(prompt_ids=[5, 6], max_tokens=10, repetition_penalty=1.2, presence_penalty=-0.5,
                            frequency_penalty=2.0, min_tokens=10, stop_token_ids=[0, TOK.vocab_size - 1],
                            logprobs=True, top_logprobs=20)).sampling
    assert s.top_logprobs == 20 and s.prompt_logprobs is None
    assert check(build_request(prompt_ids=[5], prompt_logprobs=0)).sampling.prompt_logprobs == 0
    b = check(build_request(prompt_ids=[5], logit_bias={9: -100, 3: 2.5})).sampling
    assert b.logit_bias == ((3, 2.5), (9, -100.0)) and b.biased and not b.penalized
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (pytest.approx(1.2), -0.5, 2.0)
    assert s.min_tokens == 10 and s.stop_token_ids == (0, TOK.vocab_size - 1) and s.penalized
    d = check(build_request("ab")).sampling          # unset: all off
    assert (d.repetition_penalty, d.presence_penalty, d.frequency_penalty, d.min_tokens, d.stop_token_ids) == (
        1.0, 0.0, 0.0, 0, ()) and not d.penalized


@pytest.mark.parametrize("field,kwargs,needle", [
    ("repetition_penalty", dict(repetition_penalty=0.0), "(0, 10]"),
    ("repetition_penalty", dict(repetition_penalty=10.5), "(0, 10]"),
    ("repetition_penalty", dict(repetition_penalty=float("nan")), "(0, 10]"),
    ("presence_penalty", dict(presence_penalty=2.5), "[-2, 2]"),
    ("frequency_penalty", dict(frequency_penalty=-2.01), "[-2, 2]"),
    ("frequency_penalty", dict(frequency_penalty=float("inf")), "[-2, 2]"),
    ("min_tokens", dict(min_tokens=-1), ">= 0"),
    ("min_tokens", dict(min_tokens=9, max_tokens=8), "exceeds max_tokens (8)"),
    ("stop_token_ids", dict(stop_token_ids=[3, TOK.vocab_size]), "position 1"),
    ("stop_token_ids", dict(stop_token_ids=[-1]), "outside the vocabulary"),
    ("stop_token_ids", dict(stop_token_ids=list(range(65))), "at most 64"),
    ("top_logprobs", dict(top_logprobs=21, logprobs=True), "[0, 20]"),
    ("top_logprobs", dict(top_logprobs=-1, logprobs=True), "[0, 20]"),
    ("top_logprobs", dict(top_logprobs=2), "needs return_logprobs"),
    ("prompt_logprobs", dict(prompt_logprobs=21), "[0, 20]"),
    ("prompt_logprobs", dict(prompt_logprobs=-1), "[0, 20]"),
    ("logit_bias[300]", dict(logit_bias={5: 1.0, 300: -1.0}), "outside the vocabulary"),
    ("logit_bias[5]", dict(logit_bias={5: -100.5}), "[-100, 100]"),
    ("logit_bias[5]", dict(logit_bias={5: float("nan")}), "[-100, 100]"),
])
def test_bad_penalties_and_stops(field, kwargs, needle):
    invalid(build_request("ab", **kwargs), field, needle)


def test_logit_bias_entries_are_capped():
    from dataclasses import replace
    invalid(build_request("ab", logit_bias={i: 1.0 for i in range(4)}), "logit_bias", "has 4 entries; at most 3",
            limits=replace(LIMITS, max_logit_bias=3))


def test_temperature_zero_is_greedy_not_unset():
    assert check(build_request("a", temperature=0.0)).sampling.temperature == 0.0
    assert check(build_request("a")).sampling.temperature == 1.0


@pytest.mark.parametrize("value,expected", [(pb2.PRIORITY_UNSPECIFIED, Priority.INTERACTIVE),
                                            (pb2.PRIORITY_INTERACTIVE, Priority.INTERACTIVE),
                                            (pb2.PRIORITY_BATCH, Priority.BATCH)])
def test_priorities(value, expected):
    assert check(build_request("a", priority=value)).priority is expected


def test_default_max_tokens_capped_by_room_left():
    ids = list(range(1, 29))                             # 28 of 32 positions used
    assert check(build_request(prompt_ids=ids)).sampling.max_tokens == 4


def test_boundaries_accepted():
    check(build_request(prompt_ids=[0, TOK.vocab_size - 1]))
    check(build_request(prompt_ids=list(range(1, 13)), max_tokens=20))    # 12 + 20 == 32
    check(build_request("a", top_p=1.0, request_id="x" * 16, stop=["12345678"] * 2))


def test_limits_from_model_config():
    cfg = SimpleNamespace(vocab_size=32000, max_position_embeddings=2048)
    lim = ApiLimits.from_model_config(cfg)
    assert (lim.vocab_size, lim.max_model_len, lim.max_tokens_limit) == (32000, 2048, 2048)
    assert ApiLimits.from_model_config(cfg, max_tokens_limit=64).max_tokens_limit == 64
    with pytest.raises(ValueError):
        ApiLimits(vocab_size=0, max_model_len=8)


def test_invalid_request_pickles():
    e = pickle.loads(pickle.dumps(InvalidRequest("top_k", "bad")))
    assert (e.field, e.message, str(e)) == ("top_k", "bad", "top_k: bad")


# ---- invalid inputs: each names its field ----------------------------------------------

def test_missing_prompt():
    invalid(pb2.GenerateRequest(), "prompt", "required")


def test_empty_text():
    invalid(build_request(""), "prompt", "empty")


def test_empty_token_ids():
    req = pb2.GenerateRequest()
    req.token_ids.SetInParent()
    invalid(req, "prompt", "empty")


def test_prompt_text_too_long():
    invalid(build_request("x" * 101), "prompt", "101", "100")


@pytest.mark.parametrize("bad", [-1, TOK.vocab_size, 10**6])
def test_token_id_out_of_vocab(bad):
    invalid(build_request(prompt_ids=[1, bad]), "prompt.token_ids", str(bad), "position 1")


@pytest.mark.parametrize("n", [0, -5])
def test_max_tokens_not_positive(n):
    invalid(build_request("a", max_tokens=n), "max_tokens", str(n))


def test_max_tokens_over_limit():
    invalid(build_request("a", max_tokens=21), "max_tokens", "21", "20")


def test_prompt_plus_max_tokens_over_model_len():
    msg = invalid(build_request(prompt_ids=list(range(1, 14)), max_tokens=20), "max_tokens",
                  "13", "20", "32")
    assert "max_model_len" in msg


def test_prompt_fills_context():
    invalid(build_request(prompt_ids=list(range(1, 33))), "prompt", "32", "max_model_len")


@pytest.mark.parametrize("t", [-0.1, float("nan"), float("inf")])
def test_bad_temperature(t):
    invalid(build_request("a", temperature=t), "temperature")


@pytest.mark.parametrize("p", [0.0, -0.5, 1.0001, float("nan")])
def test_bad_top_p(p):
    invalid(build_request("a", top_p=p), "top_p")


def test_bad_top_k():
    invalid(build_request("a", top_k=-1), "top_k", "-1")


def test_bad_seed():
    invalid(build_request("a", seed=-3), "seed", "-3")


def test_stop_strings():
    invalid(build_request("a", stop=["a", "b", "c"]), "stop", "3", "2")
    invalid(build_request("a", stop=["ok", ""]), "stop", "empty")
    invalid(build_request("a", stop=["123456789"]), "stop", "9", "8")


def test_request_id():
    invalid(build_request("a", request_id="x" * 17), "request_id", "17", "16")
    invalid(build_request("a", request_id="has space"), "request_id", "ASCII")
    invalid(build_request("a", request_id="naïve"), "request_id")


def test_unknown_priority():
    invalid(build_request("a", priority=7), "priority", "7")


def test_cheap_checks_run_before_tokenizing():
    class Exploding:
        def encode(self, text, add_bos=True):
            raise AssertionError("tokenized a request that was already invalid")
    with pytest.raises(InvalidRequest):
        validate_request(build_request("a", top_k=-1), LIMITS, Exploding())


def test_resumed_tokens():
    """A resumed stream's continuation: the prompt's last resumed_tokens ids were its output."""
    req = build_request(prompt_ids=[5, 6, 7, 8], max_tokens=3)
    assert check(req).resumed_tokens == 0
    req.resumed_tokens = 3
    assert check(req).resumed_tokens == 3
    for value in (4, -1):                            # the whole prompt, or less than nothing
        req.resumed_tokens = value
        invalid(req, "resumed_tokens", "must be in [0, 4)")
    many = build_request(prompt_ids=[5, 6, 7], max_tokens=3, n=2)
    many.resumed_tokens = 1
    invalid(many, "resumed_tokens", "n > 1")
    guided = build_request(prompt_ids=[5, 6, 7], max_tokens=3, guided=("regex", "a+"))
    guided.resumed_tokens = 1
    invalid(guided, "resumed_tokens", "guided decoding")

"""Guided decoding (serving/model/guided.py): specs are checked with the field at fault, the masks
hold any logits to the spec for both tokenizer kinds, the sampler masks only guided rows, and the
engine's guided requests end by themselves with output that matches (a real tiny checkpoint)."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from test_api_validation import LIMITS, check, invalid
from test_engine import _engine, _run
from test_penalties import ckpt  # noqa: F401  (a tiny mixtral checkpoint with a byte-level BPE)
from serving.client import _guided as cli_guided, build_request, continuation
from serving.engine.request import FinishReason, GenerationRequest
from serving.model.checkpoint import _write_sentencepiece_tokenizer, write_tokenizer
from serving.model.guided import Guide, GuideCompiler, apply_guides, check_guide, choice_regex
from serving.model.sampling import Sampler, SamplingParams
from serving.model.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["red", "green"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}
REGEX = r"(yes|no)-[0-9]{3}"
EBNF = 'root ::= "hello " ("world" | "there") "!"'


def _matches_schema(text: str) -> bool:
    doc = json.loads(text)
    return (set(doc) == {"ok", "n", "tag"} and isinstance(doc["ok"], bool) and isinstance(doc["n"], int) and 0 <= doc["n"] <= 99
            and doc["tag"] in ("red", "green"))


GUIDES = [(Guide("json_schema", json.dumps(SCHEMA)), _matches_schema),
          (Guide("regex", REGEX), lambda t: re.fullmatch(REGEX, t) is not None),
          (Guide("grammar", EBNF), lambda t: t in ("hello world!", "hello there!"))]


# ---- specs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,spec", [("xml", "<a/>"), ("json_object", "{}"), ("regex", "")])
def test_guide_refuses_unknown_kinds_and_missing_or_extra_specs(kind, spec):
    with pytest.raises(ValueError):
        Guide(kind, spec)


@pytest.mark.parametrize("guide,needle", [
    (Guide("json_schema", "{bad"), "is not valid JSON"),
    (Guide("json_schema", '{"type": "nonsense"}'), "nonsense"),
    (Guide("regex", "[a-"), "Unclosed '['"),
    (Guide("grammar", "root ::= "), "EBNF parser error"),
])
def test_check_guide_says_why_a_spec_does_not_parse(guide, needle):
    with pytest.raises(ValueError, match=re.escape(needle)) as ei:
        check_guide(guide)
    assert ".cc:" not in str(ei.value)          # xgrammar's source location is stripped


# ---- masks over real vocabularies ------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    sp = tmp_path_factory.mktemp("sp")
    _write_sentencepiece_tokenizer(sp)                 # the real Mixtral 32k sentencepiece model
    bpe = write_tokenizer(tmp_path_factory.mktemp("bpe"), 320)   # a byte-level BPE (`tokenizers`)
    return {"sentencepiece": Tokenizer.from_dir(sp), "tokenizers": Tokenizer.from_dir(bpe)}


def _decode_under(compiler, tok, guide, seed, steps=200) -> tuple[str, bool]:
    """Greedy over random logits, masked by `guide`: the text, and whether the grammar ended."""
    m, out = compiler.matcher(guide), []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        logits = torch.randn(1, compiler.vocab_size, generator=gen) * 4
        apply_guides(logits, [0], [m])
        t = int(logits[0].argmax())
        assert m.accept(t)
        if m.terminated:
            return tok.decode(out), True
        out.append(t)
    return tok.decode(out), False


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizers"])
def test_random_logits_under_a_guide_give_matching_text(tokenizers, kind):
    tok = tokenizers[kind]
    compiler = GuideCompiler(tok, tok.vocab_size + 7, [tok.eos_id])      # logits wider than the vocabulary
    for guide, ok in GUIDES:
        for seed in range(3):
            text, ended = _decode_under(compiler, tok, guide, seed)
            assert ended and ok(text), (kind, guide.kind, seed, text)


def test_json_object_is_an_object(tokenizers):
    tok = tokenizers["tokenizers"]
    compiler = GuideCompiler(tok, tok.vocab_size, [tok.eos_id])
    m = compiler.matcher(Guide("json_object"))
    logits = torch.zeros(1, tok.vocab_size)
    apply_guides(logits, [0], [m])
    allowed = [tok.decode([i]) for i in torch.nonzero(logits[0] == 0).flatten().tolist()]
    assert allowed and all(a.startswith("{") for a in allowed), allowed[:10]


def test_sampler_masks_only_guided_rows_and_reports_raw_logprobs(tokenizers):
    tok = tokenizers["tokenizers"]
    compiler = GuideCompiler(tok, tok.vocab_size, [tok.eos_id])
    logits = torch.randn(3, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    raw = logits.clone()
    guide = compiler.matcher(Guide("regex", "[0-9]+"))
    sampled = compiler.matcher(Guide("regex", "[0-9]+"))
    params = [SamplingParams(temperature=0, logprobs=True), SamplingParams(temperature=0, logprobs=True),
              SamplingParams(temperature=1.0, seed=3)]
    ids, logprobs, _ = Sampler().sample(logits, params, [None, None, torch.Generator().manual_seed(3)],
                                        [([1], 1)] * 3, [guide, None, sampled])
    assert tok.decode([int(ids[0])]).isdigit() and tok.decode([int(ids[2])]).isdigit()
    assert int(ids[1]) == int(raw[1].argmax())                  # the unguided row: untouched
    assert not tok.decode([int(raw[0].argmax())]).isdigit()     # so the mask did change row 0's choice
    torch.testing.assert_close(logprobs[:2], torch.log_softmax(raw, -1)[[0, 1], ids[:2]])
    torch.testing.assert_close(logits, raw)                     # the model's logits are not modified


def test_sampling_params_refuse_guides_with_ignore_eos_or_min_tokens():
    for bad in (dict(ignore_eos=True), dict(min_tokens=2)):
        with pytest.raises(ValueError, match="guided"):
            SamplingParams(max_tokens=8, guide=Guide("regex", "a+"), **bad)


# ---- the engine ------------------------------------------------------------------------------

def _guided_req(rid, guide, max_tokens=120, **sp):
    return GenerationRequest(request_id=rid, prompt_token_ids=(1, 40, 41, 42),
                             sampling=SamplingParams(max_tokens=max_tokens, guide=guide, **sp))


def test_engine_guided_requests_stop_by_themselves_with_matching_text(ckpt):
    engine = _engine(ckpt[0])
    assert engine.prepare_guides()                       # what an engine core does at warm-up
    plain = GenerationRequest(request_id="plain", prompt_token_ids=(1, 40, 41, 42),
                              sampling=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    alone = _run(engine, [plain])["plain"]
    reqs = [_guided_req(f"g{i}", g, temperature=0 if i % 2 == 0 else 0.8, seed=i) for i, (g, _) in enumerate(GUIDES)]
    events = _run(engine, [*reqs, plain])
    for r, (guide, ok) in zip(reqs, GUIDES):
        evs = events[r.request_id]
        text = "".join(e.text_delta for e in evs)
        assert evs[-1].finish_reason is FinishReason.STOP and ok(text), (guide.kind, text)
        assert evs[-1].token_id == 2                           # ended on EOS, which the grammar allowed last
    # the unguided request next to them: the same tokens as alone
    assert [e.token_id for e in events["plain"]] == [e.token_id for e in alone]


def test_engine_guided_request_cut_by_max_tokens_is_a_prefix(ckpt):
    engine = _engine(ckpt[0])
    evs = _run(engine, [_guided_req("short", Guide("json_schema", json.dumps(SCHEMA)), max_tokens=4, temperature=0)])["short"]
    text = "".join(e.text_delta for e in evs)
    assert evs[-1].finish_reason is FinishReason.LENGTH and len(evs) == 4
    assert text.startswith('{"') and not text.endswith("}")


# ---- the API: validation and the client ---------------------------------------------------------

CHOICES = ["yes", "no (1.5*x)?", "a|b", "back\\slash [x]{2}/^$-"]


def test_a_choice_is_a_regex_of_exactly_those_strings(tokenizers):
    spec = choice_regex(CHOICES)
    assert [c for c in [*CHOICES, "yes|no", "a", "no (1.5xx)?", "yesno"] if re.fullmatch(spec, c)] == CHOICES
    tok = tokenizers["sentencepiece"]
    compiler = GuideCompiler(tok, tok.vocab_size, [tok.eos_id])
    for seed in range(4):
        text, ended = _decode_under(compiler, tok, Guide("regex", spec), seed)
        assert ended and text in CHOICES, text


def test_validation_converts_each_kind():
    for kind, value, guide in [("json_schema", json.dumps(SCHEMA), Guide("json_schema", json.dumps(SCHEMA))),
                               ("json_object", True, Guide("json_object")),
                               ("regex", REGEX, Guide("regex", REGEX)), ("grammar", EBNF, Guide("grammar", EBNF))]:
        assert check(build_request("ab", guided=(kind, value))).sampling.guide == guide
    assert check(build_request("ab", guided=("choice", CHOICES))).sampling.guide == Guide("regex", choice_regex(CHOICES))
    assert check(build_request("ab")).sampling.guide is None


def test_validation_names_the_guided_field_at_fault():
    invalid(build_request("ab", guided=("regex", "[a-")), "guided.regex", "Unclosed")
    invalid(build_request("ab", guided=("json_schema", "{")), "guided.json_schema", "not valid JSON")
    invalid(build_request("ab", guided=("grammar", "  ")), "guided.grammar", "is empty")
    invalid(build_request("ab", guided=("json_object", False)), "guided.json_object", "must be true")
    empty = build_request("ab")
    empty.guided.SetInParent()
    invalid(empty, "guided", "set one of json_schema, json_object, regex, grammar, choice")
    invalid(build_request("ab", guided=("choice", ["yes", ""])), "guided.choice", "none of them empty")
    invalid(build_request("ab", guided=("choice", ["a", "b", "c"])), "guided.choice", "has 3 strings; at most 2",
            limits=replace(LIMITS, max_guide_choices=2))
    invalid(build_request("ab", guided=("regex", "a+"), ignore_eos=True), "guided", "ignore_eos")
    invalid(build_request("ab", max_tokens=5, guided=("regex", "a+"), min_tokens=2), "guided", "min_tokens")
    invalid(build_request("ab", guided=("regex", "a" * 11)), "guided.regex", "at most 10",
            limits=replace(LIMITS, max_guide_chars=10))


def test_guided_streams_are_not_resumed_and_the_cli_reads_specs_from_files(tmp_path):
    req = build_request(prompt_ids=[1, 2], max_tokens=8, guided=("regex", "a+"))
    assert continuation(req, [5]) is None
    assert continuation(build_request(prompt_ids=[1, 2], max_tokens=8), [5]) is not None
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    ns = dict(json_object=False, json_schema=None, regex=None, grammar=None, choice=None)
    from types import SimpleNamespace
    assert cli_guided(SimpleNamespace(**{**ns, "json_schema": f"@{schema}"})) == ("json_schema", json.dumps(SCHEMA))
    assert cli_guided(SimpleNamespace(**{**ns, "json_object": True})) == ("json_object", True)
    assert cli_guided(SimpleNamespace(**{**ns, "choice": ["a b", "c"]})) == ("choice", ["a b", "c"])
    assert cli_guided(SimpleNamespace(**ns)) is None
    with pytest.raises(ValueError, match="--grammar: cannot read"):
        cli_guided(SimpleNamespace(**{**ns, "grammar": f"@{tmp_path / 'missing'}"}))


def test_a_server_without_xgrammar_answers_unimplemented(monkeypatch):
    import grpc
    from serving.api import service
    from serving.model import guided

    def missing():
        raise guided.GuidedDecodingUnavailable("guided decoding needs the xgrammar package on the server")
    monkeypatch.setattr(guided, "_xgrammar", missing)
    with pytest.raises(guided.GuidedDecodingUnavailable) as ei:
        check(build_request("ab", guided=("regex", "a+")))
    failure = service._failure_for(ei.value, "r1")
    assert failure.code == grpc.StatusCode.UNIMPLEMENTED and "xgrammar" in failure.details
    assert check(build_request("ab")).sampling.guide is None       # unguided requests are unaffected


def test_the_cpu_mask_equals_xgrammars_kernel(tokenizers):
    """apply_guides' vectorized CPU path against xgrammar's own apply, all rows and some rows."""
    import xgrammar as xgr
    tok = tokenizers["sentencepiece"]
    compiler = GuideCompiler(tok, tok.vocab_size + 5, [tok.eos_id])
    matchers = [compiler.matcher(g) for g, _ in GUIDES] + [compiler.matcher(Guide("json_object"))]
    first = xgr.allocate_token_bitmask(1, compiler.vocab_size)
    for m in matchers[::2]:                          # two of them a token past their start
        m.fill(first, 0)
        step = torch.randn(1, compiler.vocab_size)
        xgr.apply_token_bitmask_inplace(step, first)
        assert m.accept(int(step.argmax()))
    logits = torch.randn(6, tok.vocab_size + 5, generator=torch.Generator().manual_seed(2))
    for rows in ([0, 1, 2, 3], [1, 4], list(range(6))):
        ms = [matchers[r % 4] for r in rows]
        ours = logits.clone()
        apply_guides(ours, rows, ms)
        ref = logits.clone()
        bitmask = xgr.allocate_token_bitmask(6, ref.shape[1])
        for r, m in zip(rows, ms):
            m.fill(bitmask, r)
        xgr.apply_token_bitmask_inplace(ref, bitmask, vocab_size=ref.shape[1], indices=rows)
        assert torch.equal(ours, ref), rows
        untouched = [r for r in range(6) if r not in rows]
        assert torch.equal(ours[untouched], logits[untouched])

"""Guided decoding (structured output): a request's tokens are held to a JSON schema, any JSON
object, a regular expression or an EBNF grammar, by masking at each step every token the grammar
cannot accept next (xgrammar, the engine behind vLLM's and SGLang's structured output).

- `Guide` is what a request asks for (plain data: it travels with SamplingParams).
- `check_guide` parses the spec without a tokenizer (~ms), so a bad one is the client's error.
- `GuideCompiler` (one per engine) compiles a guide against the tokenizer's vocabulary, cached by
  spec, and hands each request its own `GuideMatcher` (the grammar's state over that request's output).
- `apply_guides` masks the logits of the guided rows of a step in place (-inf where not allowed).

JSON comes out compact (xgrammar's `any_whitespace=False`: one space after `:` and `,`, no newlines),
so a model cannot pad it with whitespace until max_tokens (vLLM's `disable_any_whitespace`).
End of sequence is allowed only where the grammar may end, so a guided request stops by itself
(finish STOP) once its output is complete; max_tokens can still cut it short (finish LENGTH).
xgrammar is imported lazily: without it a guided request is refused (`GuidedDecodingUnavailable`),
everything else works. Shape legend: B rows, V vocab, W = ceil(V / 32) mask words.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

GUIDE_KINDS = ("json_schema", "json_object", "regex", "grammar")
JSON_OBJECT_SCHEMA = '{"type": "object"}'     # json_object: any JSON object


class GuidedDecodingUnavailable(RuntimeError):
    """xgrammar is not installed here."""


@dataclass(frozen=True, slots=True)
class Guide:
    """What the output must match. kind: json_schema (spec: the schema as JSON text), json_object
    (any JSON object; spec empty), regex (spec: the pattern, matched in full), grammar (spec: EBNF /
    GBNF text with a `root` rule)."""
    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GUIDE_KINDS:
            raise ValueError(f"guide kind must be one of {GUIDE_KINDS}, got {self.kind!r}")
        if (self.kind == "json_object") != (not self.spec):
            raise ValueError(f"a {self.kind} guide {'takes no' if self.kind == 'json_object' else 'needs a'} spec")


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:      # an optional dependency (pyproject's [guided] extra)
        raise GuidedDecodingUnavailable("guided decoding needs the xgrammar package on the server") from exc
    return xgrammar


def _build(guide: Guide, from_json_schema, from_regex, from_ebnf):
    """The guide through the builder of its kind: xgrammar's parsers (`Grammar.from_*`, no tokenizer)
    or a GrammarCompiler's compile methods (cached by spec text). Raises ValueError with xgrammar's reason."""
    try:
        if guide.kind in ("json_schema", "json_object"):
            spec = guide.spec or JSON_OBJECT_SCHEMA
            json.loads(spec)                         # a clear message for text that is not JSON at all
            return from_json_schema(spec, any_whitespace=False)
        if guide.kind == "regex":
            return from_regex(guide.spec)
        return from_ebnf(guide.spec)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON: {exc}") from None
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(_reason(exc)) from None


def _reason(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location prefix ("[time] file.cc:123: ")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    _, sep, rest = text.partition(".cc:")
    if sep:
        text = rest.split(": ", 1)[-1]
    return text[:300]


_REGEX_META = frozenset(".^$*+?()[]{}|\\/-")


def choice_regex(choices: Sequence[str]) -> str:
    """A regex (xgrammar's dialect) matching exactly one of `choices`: each escaped, alternated."""
    return "|".join("(" + "".join("\\" + c if c in _REGEX_META else c for c in text) + ")" for text in choices)


def check_guide(guide: Guide) -> None:
    """Raise ValueError (why the spec does not parse) or GuidedDecodingUnavailable."""
    xgr = _xgrammar()
    _build(guide, xgr.Grammar.from_json_schema, xgr.Grammar.from_regex, xgr.Grammar.from_ebnf)


class GuideMatcher:
    """One request's position in its grammar: which tokens may come next, fed the tokens it emits."""
    __slots__ = ("_m",)

    def __init__(self, matcher):
        self._m = matcher

    def fill(self, bitmask_BW: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask_BW, row)

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False if the grammar does not allow it (nothing changes then)."""
        return self._m.accept_token(int(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar has ended (its stop token was accepted): nothing may follow."""
        return self._m.is_terminated()


class GuideCompiler:
    """Compiles guides against one tokenizer's vocabulary (padded to the model's `vocab_size`
    logits), caching each compiled spec. Thread-safe: requests are added from other threads."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], max_threads: int = 1):
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        info = tokenizer_info(tokenizer, vocab_size, list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads)
        self._lock = threading.Lock()

    def matcher(self, guide: Guide) -> GuideMatcher:
        """A fresh matcher for one request. Raises ValueError if the spec does not compile."""
        c = self._compiler
        with self._lock:          # a spec compiled before comes from the compiler's cache, not parsed again
            compiled = _build(guide, c.compile_json_schema, c.compile_regex, c.compile_grammar)
        return GuideMatcher(_xgrammar().GrammarMatcher(compiled))


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's view of a serving.model.tokenizer.Tokenizer: every token's string as the model
    emits it (sentencepiece pieces with byte fallback, or a `tokenizers` vocabulary of the kind its
    JSON declares), the stop tokens, and ids past the tokenizer's vocabulary never allowed."""
    xgr = _xgrammar()
    backend = tokenizer.backend
    if tokenizer.kind == "sentencepiece":
        pieces = [backend.id_to_piece(i) for i in range(backend.get_piece_size())]
        return xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_FALLBACK, vocab_size=vocab_size,
                                 stop_token_ids=stop_token_ids, add_prefix_space=True)
    vocab = backend.get_vocab(with_added_tokens=True)
    pieces = [""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        pieces[i] = piece
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())   # what from_huggingface reads
    return xgr.TokenizerInfo(pieces, metadata["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=stop_token_ids, add_prefix_space=metadata["add_prefix_space"])


def apply_guides(logits_BV: torch.Tensor, rows: Sequence[int], matchers: Sequence[GuideMatcher]) -> None:
    """In place: for each (row, matcher), -inf on the logits of every token its grammar does not
    allow next. On CPU the packed mask is expanded with one vectorized op and applied in place
    (64 rows x 32k vocabulary: ~1.2-1.9 ms on 2 / 1 threads of this box, against 6.4 ms for
    xgrammar's CPU kernel); elsewhere xgrammar's own kernel applies it."""
    if not rows:
        return
    xgr = _xgrammar()
    B, V = logits_BV.shape
    bitmask_BW = xgr.allocate_token_bitmask(B, V)     # all bits set: rows not in `rows` stay as they are
    for row, m in zip(rows, matchers):
        m.fill(bitmask_BW, row)
    if logits_BV.device.type != "cpu":
        xgr.apply_token_bitmask_inplace(logits_BV, bitmask_BW.to(logits_BV.device, non_blocking=True),
                                        vocab_size=V, indices=list(rows))
        return
    if len(rows) == B:                                  # every row guided: one pass over [B, V]
        logits_BV.masked_fill_(_blocked(bitmask_BW, V), float("-inf"))
        return
    blocked_GV = _blocked(bitmask_BW[list(rows)], V)
    for g, row in enumerate(rows):                      # each row a view: nothing gathered or copied back
        logits_BV[row].masked_fill_(blocked_GV[g], float("-inf"))


_BITS_32 = (1 << torch.arange(32, dtype=torch.int64)).to(torch.int32)   # bit j of a mask word = token 32 w + j


def _blocked(bitmask_GW: torch.Tensor, V: int) -> torch.Tensor:
    """xgrammar's packed mask (int32 words, bit set = allowed) -> bool [G, V], True = not allowed."""
    return ((bitmask_GW.unsqueeze(-1) & _BITS_32) == 0).view(bitmask_GW.shape[0], -1)[:, :V]

"""Tokenizer over `tokenizer.json` (HF `tokenizers`) or `tokenizer.model` (sentencepiece), plus a streaming detokenizer."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from serving.model.chat_template import ChatTemplate

_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")


def _special_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """encode/decode with explicit BOS handling; special tokens are skipped when decoding."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_id: int | None,
                 chat_template: ChatTemplate | None = None):
        self._tok, self.kind, self.bos_id, self.eos_id = backend, kind, bos_id, eos_id
        self.chat_template = chat_template   # None: the checkpoint has none (chat requests are refused)
        # the template's BOS / EOS strings -> their ids, and the pattern that splits rendered text at them
        self._chat_specials = {s: i for s, i in ((chat_template.bos_token, bos_id), (chat_template.eos_token, eos_id))
                               if s and i is not None} if chat_template else {}
        self._chat_split = (re.compile("(" + "|".join(map(re.escape, self._chat_specials)) + ")")
                            if self._chat_specials else None)
        self._single: dict[int, str] = {}    # decode([id]) per id: the detokenizer asks for it every token

    @classmethod
    def from_dir(cls, tokenizer_dir: str | Path) -> "Tokenizer":
        d = Path(tokenizer_dir)
        if (d / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
            cfg = _read_json(d / "tokenizer_config.json")
            model_cfg = _read_json(d / "config.json")

            def find(key: str, names: tuple[str, ...]) -> int | None:
                for name in (_special_str(cfg.get(key)), *names):
                    if name is not None and tok.token_to_id(name) is not None:
                        return tok.token_to_id(name)
                ids = model_cfg.get(key + "_id")
                return ids[0] if isinstance(ids, list) else ids

            return cls(tok, "tokenizers", find("bos_token", _BOS_NAMES), find("eos_token", _EOS_NAMES),
                       ChatTemplate.from_dir(d))
        if (d / "tokenizer.model").exists():
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
            bos, eos = sp.bos_id(), sp.eos_id()
            return cls(sp, "sentencepiece", bos if bos >= 0 else None, eos if eos >= 0 else None,
                       ChatTemplate.from_dir(d))
        raise ValueError(f"no tokenizer.json or tokenizer.model in {d}")

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer` or `sentencepiece.SentencePieceProcessor` (per `kind`)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size() if self.kind == "tokenizers" else self._tok.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if self.kind == "tokenizers":
            ids = self._tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self._tok.encode(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else list(ids)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt ids of a chat: the chat template's text, its BOS / EOS token strings as those
        tokens (not their characters), the rest encoded as text. Raises ChatTemplateError (the
        template refused the messages) or ValueError (no template)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        text = self.chat_template.render(messages)
        specials = self._chat_specials
        if self._chat_split is None:
            return self.encode(text, add_bos=False)
        ids: list[int] = []
        after_special = False
        for piece in self._chat_split.split(text):
            if piece in specials:
                ids.append(specials[piece])
                after_special = True
            elif piece:
                if self.kind == "sentencepiece" and after_special and piece.startswith(" "):
                    piece = piece[1:]          # its dummy prefix is that space (as HF's legacy=False tokenizes it)
                ids.extend(self.encode(piece, add_bos=False))
                after_special = False
        return ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if len(ids) == 1:
            text = self._single.get(ids[0])
            if text is None:
                text = self._single[ids[0]] = self._decode(ids)
            return text
        return self._decode(ids)

    def _decode(self, ids: list[int]) -> str:
        if self.kind == "tokenizers":
            return self._tok.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids)   # sentencepiece drops control tokens (<s>, </s>) itself


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class IncrementalDetokenizer:
    """Turns a token stream into text deltas.

    Decodes a short window (the previously emitted token(s) plus the new ones) and diffs against the
    window's old text, so multi-token characters and sentencepiece's leading-space rule come out
    exactly as a full decode would; a delta ending in an incomplete UTF-8 sequence ("\\ufffd") is held back.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0   # window start
        self._read_offset = 0     # tokens up to here are already emitted as text
        self._text: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._text)

    def push(self, token_id: int) -> str:
        self.token_ids.append(int(token_id))
        ids = self.token_ids
        prefix_text = self.tokenizer.decode(ids[self._prefix_offset:self._read_offset])
        new_text = self.tokenizer.decode(ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        self._text.append(delta)
        return delta

    def flush(self) -> str:
        """Emit whatever is still held back (end of stream)."""
        ids = self.token_ids
        prefix_text = self.tokenizer.decode(ids[self._prefix_offset:self._read_offset])
        new_text = self.tokenizer.decode(ids[self._prefix_offset:])
        delta = new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(ids)
        self._text.append(delta)
        return delta

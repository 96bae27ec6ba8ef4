"""A checkpoint's chat template: chat messages -> the prompt text the model was trained on.

The Hugging Face convention: a Jinja template in `tokenizer_config.json` ("chat_template": a
string, or a list of {"name", "template"} of which "default" is used) or in `chat_template.jinja`,
rendered with `messages` (a list of {"role", "content"}), `add_generation_prompt`, `bos_token`
and `eos_token`, in a sandbox, with `raise_exception(msg)` for the template's own checks (roles
out of order, say). The same environment options as transformers' `apply_chat_template`
(trim_blocks, lstrip_blocks), so a template renders the same text here as there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """The template refused the messages (its raise_exception), or failed to render them."""


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_dir(cls, tokenizer_dir: str | Path) -> "ChatTemplate | None":
        """The template of a checkpoint / tokenizer directory, or None if it has none."""
        d = Path(tokenizer_dir)
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        source = cfg.get("chat_template")
        if isinstance(source, list):           # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source and (d / CHAT_TEMPLATE_FILE).exists():
            source = (d / CHAT_TEMPLATE_FILE).read_text()
        if not source:
            return None

        def token(key: str) -> str:
            value = cfg.get(key)
            return (value.get("content") if isinstance(value, dict) else value) or ""
        return cls(source, token("bos_token"), token("eos_token"))

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, ending where the assistant's answer begins."""
        import jinja2
        try:
            return _template(self.source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from None


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_COMPILED: dict[str, object] = {}


def _template(source: str):
    """Compiled once per source (a replica renders every chat request with the same one)."""
    if source not in _COMPILED:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)    # Llama 3.x templates
        env.filters["tojson"] = _tojson                                          # transformers' (no HTML escaping)
        _COMPILED[source] = env.from_string(source)
    return _COMPILED[source]


# Templates written into the checkpoints `moe-serve checkpoint` generates (serving/model/checkpoint.py).

#: Mistral / Mixtral-Instruct's ([INST] ... [/INST]; an optional system message joins the first turn).
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!') }}{%- endif %}"
    "{%- endfor %}")

#: ChatML, as Qwen's MoE models use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

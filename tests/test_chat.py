"""Chat prompts: a checkpoint's chat template (serving/model/chat_template.py) renders and encodes
a conversation as transformers' apply_chat_template and mistral-common do, and the API validates
chat requests field by field (serving/api/validation.py)."""
from __future__ import annotations

import json

import pytest
import transformers

from serving.api.errors import InvalidRequest
from serving.api.validation import ApiLimits, validate_request
from serving.client import build_request
from serving.model.chat_template import CHAT_TEMPLATE_FILE, ChatTemplate, ChatTemplateError
from serving.model.checkpoint import _write_sentencepiece_tokenizer, write_tokenizer
from serving.model.tokenizer import Tokenizer

CHATS = [
    [("user", "Hello there")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [("user", "ünïcode & <tags> [INST] inside"), ("assistant", "ok"), ("user", "  spaced  ")],
]


@pytest.fixture(scope="module", params=["sentencepiece", "bpe"])
def tokenizer_dir(request, tmp_path_factory):
    """The two tokenizers `moe-serve checkpoint` writes: Mixtral's sentencepiece with Mistral's
    template (`small`), a local byte-level BPE with ChatML (`tiny`)."""
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "sentencepiece":
        _write_sentencepiece_tokenizer(d)
    else:
        write_tokenizer(d, 320)
    return d


@pytest.mark.parametrize("chat", CHATS, ids=["one-turn", "system-and-turns", "specials-in-text"])
def test_chats_encode_as_transformers_apply_chat_template(tokenizer_dir, chat):
    ours = Tokenizer.from_dir(tokenizer_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [{"role": r, "content": c} for r, c in chat]
    theirs = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ours.encode_chat(messages) == list(theirs)
    assert ours.chat_template.render(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                         tokenize=False)


def test_mixtral_chats_encode_as_mistral_common_does(tmp_path):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    _write_sentencepiece_tokenizer(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    for chat in CHATS[:2]:
        theirs = MistralTokenizer.v1().encode_chat_completion(
            ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in chat])).tokens
        assert ours.encode_chat([{"role": r, "content": c} for r, c in chat]) == theirs


def test_the_template_comes_from_the_config_a_named_list_or_its_own_file(tmp_path):
    assert ChatTemplate.from_dir(tmp_path) is None                      # nothing there
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}]}))
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "<s>x"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / CHAT_TEMPLATE_FILE).write_text("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ eos_token }}"
                                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "user:x</s>assistant:"


def test_the_template_environment_is_transformers_own():
    """tojson without HTML escaping, loop controls and strftime_now, as real templates use them."""
    source = ("{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
              "{{ m | tojson }}{% endfor %}{{ strftime_now('%Y') }}")
    msgs = [{"role": "system", "content": "skip"}, {"role": "user", "content": "<b>ü</b>"}]
    ours = ChatTemplate(source).render(msgs)
    assert ours == transformers.utils.chat_template_utils._compile_jinja_template(source).render(
        messages=msgs, add_generation_prompt=True)
    assert '"<b>ü</b>"' in ours


def test_a_template_that_refuses_or_breaks_raises_chat_template_error(tmp_path):
    _write_sentencepiece_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    broken = ChatTemplate("{{ messages[0]['content'] | nosuchfilter }}")
    with pytest.raises(ChatTemplateError, match="the chat template failed"):
        broken.render([{"role": "user", "content": "a"}])
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")            # the sandbox holds
    with pytest.raises(ChatTemplateError):
        sandboxed.render([{"role": "user", "content": "a"}])


# ---- the API: GenerateRequest.chat ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    _write_sentencepiece_tokenizer(d)
    return Tokenizer.from_dir(d)


LIMITS = ApiLimits(vocab_size=32000, max_model_len=256, max_prompt_chars=200, max_chat_messages=4)


def test_a_chat_request_becomes_the_templates_prompt(tok):
    chat = [("system", "Be brief."), ("user", "Hi")]
    g = validate_request(build_request(messages=chat, max_tokens=5), LIMITS, tok)
    assert list(g.prompt_token_ids) == tok.encode_chat([{"role": r, "content": c} for r, c in chat])
    assert g.prompt_token_ids[0] == tok.bos_id and g.sampling.max_tokens == 5


@pytest.mark.parametrize("chat,field,needle", [
    ([], "prompt.chat.messages", "is empty"),
    ([("user", "a"), ("robot", "b")], "prompt.chat.messages[1].role", "'robot' is not one of"),
    ([("user", "a")] * 5, "prompt.chat.messages", "has 5 messages; at most 4"),
    ([("user", "x" * 150), ("assistant", "y" * 51)], "prompt.chat.messages", "hold 201 characters"),
    ([("user", "a"), ("user", "b")], "prompt.chat.messages", "chat template refused them: After the optional"),
])
def test_bad_chats_name_the_field(tok, chat, field, needle):
    req = build_request(messages=chat, max_tokens=5)
    if not chat:
        req.chat.SetInParent()                      # the oneof set, with no messages
    with pytest.raises(InvalidRequest) as ei:
        validate_request(req, LIMITS, tok)
    assert ei.value.field == field and needle in str(ei.value)


def test_a_model_without_a_chat_template_refuses_chats_by_name(tmp_path):
    write_tokenizer(tmp_path, 320)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidRequest) as ei:
        validate_request(build_request(messages=[("user", "hi")]), ApiLimits(vocab_size=320, max_model_len=64),
                         Tokenizer.from_dir(tmp_path))
    assert ei.value.field == "prompt.chat" and "no chat template" in str(ei.value)

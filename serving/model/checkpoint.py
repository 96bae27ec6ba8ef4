"""Seeded random HF-format checkpoints (config.json + safetensors + tokenizer) for tests and benchmarks.

`tiny`: hidden 64, 2 layers, 4 experts top-2, expert I 128, 4 heads / 2 KV heads, head_dim 16,
        vocab 1024, byte-level BPE trained here on a built-in corpus (tokenizer.json).
`small`: hidden 512, 4 layers, 8 experts top-2, expert I 1024, 8 heads / 2 KV heads, head_dim 64,
         vocab 32000, Mixtral's sentencepiece tokenizer from mistral-common; weights in 2 shards.
qwen2_moe adds a shared expert of the expert size, q/k/v biases and norm_topk_prob=False (as Qwen1.5-MoE).
The other families (CHECKPOINT_FAMILIES) keep these dims and add their own structure, as their real models do:
qwen3_moe q/k norms; deepseek_v3 MLA (tiny: q_lora 32, kv_lora 32, nope 16 + rope 8, v 16; small: 256, 128,
64 + 32, 64), sigmoid routing over 2 (4) groups, a shared expert and a dense first layer (I 256 / 2048);
hunyuan_v1_moe q/k norms after rope and an ungated shared MLP; olmoe full-projection q/k norms; gpt_oss
attention sinks, sliding window 8 (128) on even layers, yarn rope, biased router and fused clamped-SwiGLU experts.
"""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from serving.model.chat_template import CHATML_TEMPLATE, MISTRAL_TEMPLATE
from serving.model.quantization import (GPT_OSS_MXFP4_CONFIG, FP8BlockQuant, hf_quantization_config, mxfp4_experts,
                                        quantize_tensors)

# write_checkpoint(weights=...): all in `dtype`, block-wise FP8 projections, or (gpt_oss) MXFP4 experts
WEIGHT_FORMATS = ("float", "fp8", "mxfp4")

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_experts=4, top_k=2, intermediate=128,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_experts=8, top_k=2, intermediate=1024,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=32000),
}
STD = 0.02           # HF initializer_range
LM_HEAD_STD = 0.1    # logits std ~ 0.1*sqrt(D): peaked enough that sampled text is not uniform noise

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving system turns requests into tokens and tokens into text.
Mixture of experts models route every token to a few experts, so only part of the network runs for each token.
The router picks the top experts by softmax score, and the outputs are added together with those weights.
Attention reads the keys and values of earlier tokens from the cache, which grows by one entry per step.
When the queue is long the scheduler admits fewer new requests and the autoscaler adds another replica.
Latency is measured in seconds, throughput in tokens per second, and memory in bytes.
Once upon a time there was a little town by the sea where the people fished in the morning and sang at night.
The weather today is sunny with a light wind from the west, and tomorrow there may be rain in the afternoon.
She opened the old book, read the first page twice, and then closed it with a smile.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in text, as do dates, times and prices such as $9.99.
Good software is simple to read, easy to test, and honest about what it does not do.
He asked where the station was, and the woman pointed down the street past the bakery and the library.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
The children played in the garden while their parents cooked dinner and talked about the week.
Every model has a vocabulary, a set of weights, and a configuration that describes its shape.
Please write a short story about a robot who learns to paint the mountains at sunrise.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
Machine learning systems need careful engineering: batching, caching, scheduling and monitoring.
If a shard fails, the requests that used it are retried on another replica without losing the stream.
The engine runs one step at a time: schedule, execute the model, sample, and update every request.
Tokenizers split words into pieces: common words stay whole, while rare words become several smaller parts.
In the spring the farmers plant wheat and corn; in the autumn they harvest the fields and store the grain.
Our team meets on Monday and Thursday to review the dashboards, the alerts, and the open issues.
The museum was quiet, except for the footsteps of a guard walking slowly between the paintings.
Because the bridge was closed for repairs, the bus took a longer route through the valley and the forest.
Could you explain how a transformer layer works? It mixes tokens with attention and transforms each one with an MLP.
My favourite fruits are apples, oranges, bananas, cherries, grapes, lemons, mangoes and strawberries.
The orchestra played a symphony by Beethoven, and the audience stood up to applaud for several minutes.
Remember to drink water, sleep well, exercise often, and call your friends and family every week.
The spacecraft entered orbit around Mars, sent photographs of the red desert, and measured the thin atmosphere.
Engineers compare benchmarks carefully: same hardware, same batch size, same prompts, and several repetitions.
A gentle breeze moved through the tall grass as the sun slowly disappeared behind the purple hills.
"""


CHECKPOINT_FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "hunyuan_v1_moe", "olmoe",
                                         "gpt_oss")

# family-specific dims on top of SIZES (DeepSeek MLA ranks / head split, its dense-layer MLP; gpt_oss window)
_EXTRA = {
    "deepseek_v3": {
        "tiny": dict(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     n_group=2, topk_group=1, dense_intermediate=256),
        "small": dict(q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                      n_group=4, topk_group=2, dense_intermediate=2048),
    },
    "gpt_oss": {"tiny": dict(sliding_window=8), "small": dict(sliding_window=128)},
}


def _hf_config(family: str, s: dict) -> dict:
    common = dict(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["head_dim"], hidden_act="silu", max_position_embeddings=4096, initializer_range=STD,
        num_experts_per_tok=s["top_k"], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=None, attention_dropout=0.0, use_cache=True, output_router_logits=False,
        router_aux_loss_coef=0.001, dtype="float32", transformers_version="5.24.0",
    )
    L, E, I = s["num_hidden_layers"], s["num_experts"], s["intermediate"]
    if family == "mixtral":
        return dict(architectures=["MixtralForCausalLM"], model_type="mixtral", **common,
                    intermediate_size=I, num_local_experts=E, rms_norm_eps=1e-5,
                    rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
                    sliding_window=None, router_jitter_noise=0.0)
    if family == "qwen2_moe":
        return dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", **common,
                    intermediate_size=I, moe_intermediate_size=I, shared_expert_intermediate_size=I, num_experts=E,
                    rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1e4, "rope_type": "default"},
                    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
                    use_sliding_window=False, sliding_window=None, max_window_layers=L,
                    layer_types=["full_attention"] * L)
    if family == "qwen3_moe":   # as Qwen3-30B-A3B: q/k per-head RMSNorm, normalised top-k, no biases
        return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", **common,
                    intermediate_size=2 * I, moe_intermediate_size=I, num_experts=E, rms_norm_eps=1e-6,
                    rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, use_sliding_window=False,
                    sliding_window=None)
    if family == "deepseek_v3":   # MLA, sigmoid group-limited routing, 1 shared expert, first layer dense
        x = _EXTRA["deepseek_v3"][s["size"]]
        cfg = {**common, "num_key_value_heads": s["num_attention_heads"], "head_dim": x["qk_rope_head_dim"]}
        return dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", **cfg,
                    intermediate_size=x["dense_intermediate"], moe_intermediate_size=I, n_routed_experts=E,
                    n_shared_experts=1, routed_scaling_factor=2.5, n_group=x["n_group"], topk_group=x["topk_group"],
                    norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=x["q_lora_rank"],
                    kv_lora_rank=x["kv_lora_rank"], qk_nope_head_dim=x["qk_nope_head_dim"],
                    qk_rope_head_dim=x["qk_rope_head_dim"], v_head_dim=x["v_head_dim"], rope_interleave=True,
                    rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1e4, "rope_type": "default"},
                    attention_bias=False)
    if family == "hunyuan_v1_moe":   # q/k per-head RMSNorm after rope, ungated shared MLP of the expert size
        cfg = {k: v for k, v in common.items() if k != "num_experts_per_tok"}
        return dict(architectures=["HunYuanMoEV1ForCausalLM"], model_type="hunyuan_v1_moe", **cfg,
                    intermediate_size=I, num_experts=E, moe_topk=s["top_k"], rms_norm_eps=1e-5,
                    rope_parameters={"rope_theta": 1e4, "rope_type": "default"}, attention_bias=False)
    if family == "olmoe":   # q/k RMSNorm over the whole projection, un-normalised top-k
        return dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", **common,
                    intermediate_size=I, num_experts=E, norm_topk_prob=False, clip_qkv=None, rms_norm_eps=1e-5,
                    rope_parameters={"rope_theta": 1e4, "rope_type": "default"}, attention_bias=False)
    if family == "gpt_oss":   # sinks, alternating sliding/full layers, biased router + clamped-SwiGLU experts, yarn
        cfg = {**common, "max_position_embeddings": 131072}
        return dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", **cfg,
                    intermediate_size=I, num_local_experts=E, rms_norm_eps=1e-5, attention_bias=True,
                    sliding_window=_EXTRA["gpt_oss"][s["size"]]["sliding_window"],
                    layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)],
                    swiglu_alpha=1.702, swiglu_limit=7.0,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096})
    raise ValueError(f"unsupported family {family!r} ({' | '.join(CHECKPOINT_FAMILIES)})")


def _tensor_shapes(family: str, s: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF tensor name -> (shape, init) with init one of normal | ones | lm_head | bias.

    Names and layouts are what transformers 5.24 `save_pretrained` writes: per-expert tensors, except
    gpt_oss whose experts stay fused (`gate_up_proj` [E, D, 2I] gate/up interleaved, `down_proj` [E, I, D]).
    """
    D, V, I, hd, E = s["hidden_size"], s["vocab_size"], s["intermediate"], s["head_dim"], s["num_experts"]
    H, Hkv = s["num_attention_heads"], s["num_key_value_heads"]
    q, kv = H * hd, Hkv * hd
    out: dict[str, tuple[tuple[int, ...], str]] = {"model.embed_tokens.weight": ((V, D), "normal")}
    for l in range(s["num_hidden_layers"]):
        p = f"model.layers.{l}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = ((D,), "ones")
        out[p + "post_attention_layernorm.weight"] = ((D,), "ones")
        if family == "deepseek_v3":
            x = _EXTRA["deepseek_v3"][s["size"]]
            ql, R, dn, dr, dv = (x[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                "v_head_dim"))
            out[a + "q_a_proj.weight"] = ((ql, D), "normal")
            out[a + "q_a_layernorm.weight"] = ((ql,), "ones")
            out[a + "q_b_proj.weight"] = ((H * (dn + dr), ql), "normal")
            out[a + "kv_a_proj_with_mqa.weight"] = ((R + dr, D), "normal")
            out[a + "kv_a_layernorm.weight"] = ((R,), "ones")
            out[a + "kv_b_proj.weight"] = ((H * (dn + dv), R), "normal")
            out[a + "o_proj.weight"] = ((D, H * dv), "normal")
        else:
            for n, rows in (("q", q), ("k", kv), ("v", kv)):
                out[a + f"{n}_proj.weight"] = ((rows, D), "normal")
                if family in ("qwen2_moe", "gpt_oss"):
                    out[a + f"{n}_proj.bias"] = ((rows,), "bias")
            out[a + "o_proj.weight"] = ((D, q), "normal")
        if family == "gpt_oss":
            out[a + "o_proj.bias"] = ((D,), "bias")
            out[a + "sinks"] = ((H,), "normal")
        if family == "qwen3_moe":
            out[a + "q_norm.weight"], out[a + "k_norm.weight"] = ((hd,), "ones"), ((hd,), "ones")
        if family == "hunyuan_v1_moe":
            out[a + "query_layernorm.weight"], out[a + "key_layernorm.weight"] = ((hd,), "ones"), ((hd,), "ones")
        if family == "olmoe":
            out[a + "q_norm.weight"], out[a + "k_norm.weight"] = ((q,), "ones"), ((kv,), "ones")
        m = p + ("block_sparse_moe." if family == "mixtral" else "mlp.")
        if family == "deepseek_v3" and l == 0:   # first_k_dense_replace = 1
            dI = _EXTRA["deepseek_v3"][s["size"]]["dense_intermediate"]
            for n, shape in (("gate_proj", (dI, D)), ("up_proj", (dI, D)), ("down_proj", (D, dI))):
                out[m + f"{n}.weight"] = (shape, "normal")
            continue
        if family == "gpt_oss":
            out[m + "router.weight"], out[m + "router.bias"] = ((E, D), "normal"), ((E,), "bias")
            out[m + "experts.gate_up_proj"] = ((E, D, 2 * I), "normal")
            out[m + "experts.gate_up_proj_bias"] = ((E, 2 * I), "bias")
            out[m + "experts.down_proj"] = ((E, I, D), "normal")
            out[m + "experts.down_proj_bias"] = ((E, D), "bias")
            continue
        out[m + ("gate.wg.weight" if family == "hunyuan_v1_moe" else "gate.weight")] = ((E, D), "normal")
        if family == "deepseek_v3":
            out[m + "gate.e_score_correction_bias"] = ((E,), "bias")
        names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(E):
            out[m + f"experts.{e}.{names[0]}.weight"] = ((I, D), "normal")
            out[m + f"experts.{e}.{names[1]}.weight"] = ((I, D), "normal")
            out[m + f"experts.{e}.{names[2]}.weight"] = ((D, I), "normal")
        shared = {"qwen2_moe": "shared_expert.", "deepseek_v3": "shared_experts.", "hunyuan_v1_moe": "shared_mlp."}
        if family in shared:
            for n, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
                out[m + shared[family] + f"{n}.weight"] = (shape, "normal")
        if family == "qwen2_moe":
            out[m + "shared_expert_gate.weight"] = ((1, D), "normal")
    out["model.norm.weight"] = ((D,), "ones")
    out["lm_head.weight"] = ((V, D), "lm_head")
    return out


def _write_bpe_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:   # the corpus must be rich enough to fill the vocabulary
        raise RuntimeError(f"BPE trained {tok.get_vocab_size()} tokens, expected {vocab_size}")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=4096, chat_template=CHATML_TEMPLATE), indent=2))


def write_tokenizer(out_dir: str | Path, vocab_size: int) -> Path:
    """A byte-level BPE of exactly `vocab_size` tokens (<unk>=0, <s>=1, </s>=2), trained locally,
    for a checkpoint that has none (e.g. one written by transformers in a test)."""
    out = Path(out_dir)
    _write_bpe_tokenizer(out, vocab_size)
    return out


def _write_sentencepiece_tokenizer(out: Path) -> None:
    src = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    with resources.as_file(src) as path:
        shutil.copyfile(path, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False, legacy=False, model_max_length=4096,
        chat_template=MISTRAL_TEMPLATE), indent=2))


ROUTER_WEIGHTS = (".gate.weight", ".gate.wg.weight", ".router.weight")   # [E, D] per family


def _skew_router(tensors: dict[str, torch.Tensor], hot: list[int], gain: float, D: int,
                 gen: torch.Generator) -> None:
    u_D = torch.randn(D, generator=gen)
    u_D /= u_D.norm()
    row_norm = STD * D ** 0.5                     # norm of a random embedding / router row
    tensors["model.embed_tokens.weight"] += row_norm * u_D
    for name, w_ED in tensors.items():
        if name.endswith(ROUTER_WEIGHTS):         # only the hot rows see u: the rest stay uniform
            w_ED -= torch.outer(w_ED @ u_D, u_D)  # logit std ~ STD*sqrt(D); h.u ~ sqrt(D/2) after RMSNorm
            w_ED[hot] += gain * STD * 2 ** 0.5 * u_D


def write_checkpoint(family: str, size: str, out_dir: str | Path, seed: int = 0,
                     dtype: torch.dtype = torch.float32, hot_experts: tuple[int, ...] = (),
                     hot_gain: float = 4.0, weights: str = "float") -> Path:
    """Write a seeded random `family` checkpoint of `size` (tiny | small) to `out_dir`; returns the dir.

    `hot_experts` skews the expert load, as real models have (placement and per-shard
    autoscaling are exercised with it): every token embedding gets a shared direction u (real
    hidden states have such a dominant direction), and the hot experts' router rows point
    along it, so their logits are raised by about `hot_gain` logit standard deviations.
    `weights="fp8"`: the projections stored in block-wise FP8 (128 x 128 blocks, as DeepSeek-V3's
    checkpoints; serving/model/quantization.py), the rest in `dtype`; `weights="mxfp4"` (gpt_oss): the
    routed experts in MXFP4, as openai/gpt-oss ships them."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unsupported weights {weights!r} ({' | '.join(WEIGHT_FORMATS)})")
    if weights == "mxfp4" and family != "gpt_oss":
        raise ValueError(f"weights 'mxfp4' is gpt_oss's format (its fused experts), not {family}'s")
    if size not in SIZES:
        raise ValueError(f"unsupported size {size!r} ({' | '.join(SIZES)})")
    if family not in CHECKPOINT_FAMILIES:
        raise ValueError(f"unsupported family {family!r} ({' | '.join(CHECKPOINT_FAMILIES)})")
    s = {**SIZES[size], "size": size}
    config = _hf_config(family, s)
    config["dtype"] = str(dtype).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (shape, init) in sorted(_tensor_shapes(family, s).items()):
        if init == "ones":
            t = torch.ones(shape)
        else:
            std = {"normal": STD, "lm_head": LM_HEAD_STD, "bias": STD}[init]
            t = torch.randn(shape, generator=gen).mul_(std)
        tensors[name] = t
    if hot_experts:
        _skew_router(tensors, list(hot_experts), hot_gain, s["hidden_size"], gen)
    tensors = {n: t.to(dtype) for n, t in tensors.items()}
    if weights == "fp8":
        tensors = quantize_tensors(tensors, FP8BlockQuant())
        config["quantization_config"] = hf_quantization_config(FP8BlockQuant())
    elif weights == "mxfp4":
        tensors = mxfp4_experts(tensors)
        config["quantization_config"] = GPT_OSS_MXFP4_CONFIG

    for stale in (*out.glob("*.safetensors"), out / "model.safetensors.index.json"):
        stale.unlink(missing_ok=True)
    if size == "small":   # two shards + index, so the sharded path is exercised
        half, acc, shards = sum(t.numel() for t in tensors.values()) // 2, 0, ({}, {})
        for n, t in tensors.items():
            shards[0 if acc < half else 1][n] = t
            acc += t.numel()
        files = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        for f, shard in zip(files, shards):
            save_file(shard, str(out / f), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: files[i] for i, shard in enumerate(shards) for n in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_sentencepiece_tokenizer(out)
    else:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        _write_bpe_tokenizer(out, s["vocab_size"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "5.24.0"}, indent=2))
    return out

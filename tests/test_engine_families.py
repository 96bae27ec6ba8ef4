"""Every family through the real engine (scheduler, KV cache of the family's layout, continuous
batching, expert dispatch over 2 shards): greedy tokens equal transformers' for concurrent
requests of different lengths. Checkpoints are written by transformers itself."""
import pytest
import torch

from hf_reference import build_hf_checkpoint
from serving.engine.engine import Engine
from serving.engine.request import GenerationRequest
from serving.engine.scheduler import SchedulerConfig
from serving.model.checkpoint import write_tokenizer
from serving.model.config import SUPPORTED_FAMILIES
from serving.model.model import MoEModel
from serving.model.sampling import SamplingParams
from serving.model.tokenizer import Tokenizer
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement

VOCAB = 300


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_engine_greedy_matches_transformers(family, tmp_path):
    path, hf = build_hf_checkpoint(tmp_path, family, vocab_size=VOCAB, max_position_embeddings=128)
    write_tokenizer(path, VOCAB)
    model = MoEModel.from_checkpoint(path)
    placement = Placement.build(model.config, 2, "round_robin")
    workers = [ExpertShardWorker.from_checkpoint(path, placement, s) for s in range(2)]
    engine = Engine(model, ExpertDispatcher(placement, LocalTransport(workers), model.config.num_experts),
                    Tokenizer.from_dir(path), SchedulerConfig(max_num_seqs=4, max_model_len=128))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 19, 8)]
    events = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(request_id=str(i), prompt_token_ids=tuple(p),
                                             sampling=SamplingParams(max_tokens=32, temperature=0)),
                           events[i].append)
    for _ in range(200):
        if not engine.has_work():
            break
        engine.step()
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
        assert [e.token_id for e in events[i]] == ref, (family, i)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_prefix_caching_and_shared_block_attention_keep_transformers_tokens(family, tmp_path, monkeypatch):
    """A request caches a 40-token prefix (10 blocks of 4); three more share it, decoding together:
    their steps attend to the shared blocks once for all (decode_attention's `prefix`, where the
    family's attention takes that path), and each still gets transformers' greedy tokens."""
    from serving.model import layers
    path, hf = build_hf_checkpoint(tmp_path, family, vocab_size=VOCAB, max_position_embeddings=128)
    write_tokenizer(path, VOCAB)
    model = MoEModel.from_checkpoint(path)
    placement = Placement.build(model.config, 2, "round_robin")
    workers = [ExpertShardWorker.from_checkpoint(path, placement, s) for s in range(2)]
    engine = Engine(model, ExpertDispatcher(placement, LocalTransport(workers), model.config.num_experts),
                    Tokenizer.from_dir(path), SchedulerConfig(max_num_seqs=4, max_model_len=128, block_size=4,
                                                              prefix_caching=True))
    shared_calls, plain = [], layers.decode_attention

    def counting(*args, prefix=None, **kw):
        shared_calls.append(prefix is not None)
        return plain(*args, prefix=prefix, **kw)
    monkeypatch.setattr(layers, "decode_attention", counting)
    g = torch.Generator().manual_seed(9)
    system = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    prompts = [system + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (2, 1, 6, 3)]

    def run(batch: dict[int, list[int]]) -> dict[int, list[int]]:
        events = {i: [] for i in batch}
        for i, p in batch.items():
            engine.add_request(GenerationRequest(request_id=str(i), prompt_token_ids=tuple(p),
                                                 sampling=SamplingParams(max_tokens=12, temperature=0)),
                               events[i].append)
        for _ in range(200):
            if not engine.has_work():
                break
            engine.step()
        return {i: [e.token_id for e in ev] for i, ev in events.items()}
    out = run({0: prompts[0]})
    out.update(run({i: prompts[i] for i in (1, 2, 3)}))
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                          attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
        assert out[i] == ref, (family, i)
    assert engine.stats.prefix_hit_tokens_total == 3 * 40
    windows = model.config.sliding_window or model.config.layer_windows
    if not windows and all(getattr(lw, "sinks", None) is None for lw in model.weights.layers):
        assert any(shared_calls), family

"""Every family through the real engine (scheduler, KV cache of the family's layout, continuous
batching, expert dispatch over 2 shards): greedy tokens equal transformers' for concurrent
requests of different lengths. Checkpoints are written by transformers itself."""
import pytest
import torch

from hf_reference import build_hf_checkpoint
from test_engine import _hf_greedy
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


def _family_engine(family: str, tmp_path, **sched) -> tuple[Engine, object, MoEModel]:
    """The family's transformers checkpoint served by the engine (2 shards, 4 slots): (engine, hf, model)."""
    path, hf = build_hf_checkpoint(tmp_path, family, vocab_size=VOCAB, max_position_embeddings=128)
    write_tokenizer(path, VOCAB)
    model = MoEModel.from_checkpoint(path)
    placement = Placement.build(model.config, 2, "round_robin")
    workers = [ExpertShardWorker.from_checkpoint(path, placement, s) for s in range(2)]
    engine = Engine(model, ExpertDispatcher(placement, LocalTransport(workers), model.config.num_experts),
                    Tokenizer.from_dir(path), SchedulerConfig(max_num_seqs=4, max_model_len=128, **sched))
    return engine, hf, model


def _greedy(engine: Engine, batch: dict[int, list[int]], max_tokens: int) -> dict[int, list[int]]:
    """Run `batch` (request id -> prompt) together until done: each request's greedy tokens."""
    events = {i: [] for i in batch}
    for i, p in batch.items():
        engine.add_request(GenerationRequest(request_id=str(i), prompt_token_ids=tuple(p),
                                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0)),
                           events[i].append)
    for _ in range(200):
        if not engine.has_work():
            break
        engine.step()
    return {i: [e.token_id for e in ev] for i, ev in events.items()}


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_engine_greedy_matches_transformers(family, tmp_path):
    engine, hf, _ = _family_engine(family, tmp_path)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 19, 8)]
    out = _greedy(engine, dict(enumerate(prompts)), 32)
    for i, p in enumerate(prompts):
        assert out[i] == _hf_greedy(hf, p, 32), (family, i)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_prefix_caching_and_shared_block_attention_keep_transformers_tokens(family, tmp_path, monkeypatch):
    """A request caches a 40-token prefix (10 blocks of 4); three more share it, decoding together:
    their steps attend to the shared blocks once for all (decode_attention's `prefix`, where the
    family's attention takes that path), and each still gets transformers' greedy tokens."""
    from serving.model import layers
    engine, hf, model = _family_engine(family, tmp_path, block_size=4, prefix_caching=True)
    shared_calls, plain = [], layers.decode_attention

    def counting(*args, prefix=None, **kw):
        shared_calls.append(prefix is not None)
        return plain(*args, prefix=prefix, **kw)
    monkeypatch.setattr(layers, "decode_attention", counting)
    g = torch.Generator().manual_seed(9)
    system = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    prompts = [system + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (2, 1, 6, 3)]
    out = _greedy(engine, {0: prompts[0]}, 12)
    out.update(_greedy(engine, {i: prompts[i] for i in (1, 2, 3)}, 12))
    for i, p in enumerate(prompts):
        assert out[i] == _hf_greedy(hf, p, 12), (family, i)
    assert engine.stats.prefix_hit_tokens_total == 3 * 40
    windows = model.config.sliding_window or model.config.layer_windows
    if not windows and all(getattr(lw, "sinks", None) is None for lw in model.weights.layers):
        assert any(shared_calls), family

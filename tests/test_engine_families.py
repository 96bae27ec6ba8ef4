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

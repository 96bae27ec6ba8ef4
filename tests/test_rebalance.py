"""Rebalancing while serving (in-process, the local transport): a running request keeps its
tokens, and each shard loads only the experts it newly serves."""
import torch

from hf_reference import build_hf_checkpoint
from serving.engine.engine import Engine
from serving.engine.request import GenerationRequest
from serving.engine.scheduler import SchedulerConfig
from serving.model.checkpoint import write_tokenizer
from serving.model.model import MoEModel
from serving.model.sampling import SamplingParams
from serving.model.tokenizer import Tokenizer
from serving.parallel.dispatcher import ExpertDispatcher, LocalTransport
from serving.parallel.expert_shard import ExpertShardWorker
from serving.parallel.placement import Placement


def test_rebalance_mid_generation_keeps_tokens_and_loads_only_new_experts(tmp_path):
    vocab = 300
    path, _ = build_hf_checkpoint(tmp_path, "mixtral", vocab_size=vocab, num_local_experts=6,
                                  num_experts_per_tok=2, max_position_embeddings=128)
    write_tokenizer(path, vocab)
    model = MoEModel.from_checkpoint(path)
    start = Placement.build(model.config, 3, "contiguous")

    def run(switch_at: int | None):
        workers = [ExpertShardWorker.from_checkpoint(path, start, s) for s in range(3)]
        disp = ExpertDispatcher(start, LocalTransport(workers), model.config.num_experts)
        eng = Engine(model, disp, Tokenizer.from_dir(path), SchedulerConfig(max_num_seqs=2, max_model_len=128))
        events = []
        eng.add_request(GenerationRequest(request_id="r", prompt_token_ids=(5, 9, 44, 7),
                                          sampling=SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)),
                        events.append)
        new = None
        for step in range(100):
            if step == switch_at:   # skewed plan: expert 0 replicated, everything reshuffled
                load = {layer: [60, 1, 1, 5, 9, 2] for layer in start.layers}
                new = Placement.build(model.config, 3, "load_aware", load=load, redundant=2)
                disp.set_placement(new)
                for w in workers:
                    w.retain(new.experts_of(w.shard_id))
            if not eng.has_work():
                break
            eng.step()
        return [e.token_id for e in events], workers, new

    baseline, _, _ = run(None)
    switched, workers, new = run(10)
    assert switched == baseline and len(baseline) == 30
    for w in workers:
        gained = {(l, e) for l, ex in new.experts_of(w.shard_id).items() for e in ex} - \
                 {(l, e) for l, ex in start.experts_of(w.shard_id).items() for e in ex}
        assert w.loads_total <= len(gained)                      # nothing but newly needed experts
        for layer, held in w.expert_ids().items():              # old experts dropped, new ones on use
            assert set(held) <= set(new.experts_of(w.shard_id)[layer])
    assert sum(w.loads_total for w in workers) > 0

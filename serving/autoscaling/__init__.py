"""Autoscaling: pure policies (policy.py), the signals they read (signals.py), Serve glue
(ray_adapter.py), Ray's default policy mirrored (ray_default.py), and the fleet simulator that
replays traces against the same code (simulator.py, traces.py, calibration.py). Only
ray_adapter/decisions' metrics hook touch Ray, and only when called."""
from serving.autoscaling.policy import (Decision, EnginePolicyConfig, PolicyState, Reason, ScalingConfig,
                                        ShardPolicyConfig, decide_engine_replicas, decide_shard_replicas,
                                        plan_shard_replicas)
from serving.autoscaling.signals import (ENGINE_ARRIVALS_PER_S, ENGINE_COMPLETED_PER_S, ENGINE_PREFILL_TOKENS_WAITING,
                                         ENGINE_QUEUE_DEPTH, ENGINE_RUNNING, ENGINE_TTFT_P90_S, ENGINE_TTFT_P99_S,
                                         SHARD_BUSY_FRACTION, SHARD_TOKENS_PER_S, ShardSignals, Signals,
                                         engine_autoscaling_stats, shard_autoscaling_stats)

__all__ = [
    "Decision", "EnginePolicyConfig", "PolicyState", "Reason", "ScalingConfig", "ShardPolicyConfig",
    "decide_engine_replicas", "decide_shard_replicas", "plan_shard_replicas",
    "ENGINE_ARRIVALS_PER_S", "ENGINE_COMPLETED_PER_S", "ENGINE_PREFILL_TOKENS_WAITING", "ENGINE_QUEUE_DEPTH",
    "ENGINE_RUNNING", "ENGINE_TTFT_P90_S", "ENGINE_TTFT_P99_S", "SHARD_BUSY_FRACTION", "SHARD_TOKENS_PER_S",
    "ShardSignals", "Signals", "engine_autoscaling_stats", "shard_autoscaling_stats",
]

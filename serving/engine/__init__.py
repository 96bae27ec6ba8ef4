"""Continuous-batching engine: scheduler, KV-slot accounting, the step loop."""

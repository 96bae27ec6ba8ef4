"""Pure-torch MoE model math. No ray, grpc or deepspeed imports in this package."""

"""Expert parallelism: placement of experts on shards, dispatch/combine, transports."""

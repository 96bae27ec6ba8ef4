"""Request routing to engine replicas: the prefix-affinity policy (prefix_affinity.py, no Ray)
and the Serve request router around it (ray_router.py)."""

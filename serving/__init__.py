"""Distributed Mixture-of-Experts LLM serving on Ray Serve, answering over gRPC."""

"""Thin Ray Serve deployments around the plain objects, and the app builder."""

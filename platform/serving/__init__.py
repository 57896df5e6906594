"""Serving a model with Ray Serve behind an OpenAI-compatible API."""

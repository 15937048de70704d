"""Benchmarks: one batch straight through the model runner, and serving load against a running server."""

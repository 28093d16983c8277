"""Helpers for the tests, benchmarks and the quickstart, never imported by the library or the toolkits:
tiny HF models built in-process from shrunk real configs."""

"""Helpers shared by the tests, benchmarks and the quickstart: tiny HF models built from shrunk real
configs, and a launcher that runs a function on N real gloo/NCCL processes."""

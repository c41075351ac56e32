"""Benchmarks as jobs: each prints one JSON line (``python -m jobs.bench.<name>``)."""

"""Benchmarks of CE-CoLLM against its baselines: `ce-collm bench` (run.py), reports, perf_analyzer recipes."""

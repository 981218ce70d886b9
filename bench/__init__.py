"""Benchmarks: `python -m bench` measures our scoring, training and app against naive baselines."""

"""Benchmarks: `python -m rlp_dist.bench <name> --json OUT [options]`.

Each benchmark is a module ``rlp_dist.bench.<name>`` exposing ``main(argv) -> dict | list`` that
runs the measured path and its baseline side by side and returns the JSON-serialisable result.
Targets (ratios) live here, never in timed unit tests.
"""

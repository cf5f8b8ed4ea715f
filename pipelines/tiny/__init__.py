"""Tiny FLUX.2-architecture models built in code (random weights), saved in the real file layouts.

Used by the tests, the benchmarks and the demo: the real loading and inference code runs on them.
"""

"""Benchmarks of the model layer: ``kernel`` (fused MLP + adapter, GPU) and ``model`` (whole model).

Each returns a JSON-able report and has a text formatter; ``cli/bench.py`` wires them to
``aat bench kernel|model``.
"""

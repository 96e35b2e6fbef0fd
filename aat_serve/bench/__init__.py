"""Every benchmark of aat-serve, run as ``aat bench kernel|model|memory|serve|training``.

Each module measures one thing against a baseline taken in the same run and returns a JSON-able
report with a text formatter; ``common`` holds what they share (the machine description,
interleaved timing, the table printer) and ``fixtures`` the random backbones and task bundles.
The argument parsing lives in ``aat_serve.cli.bench``. Benchmarks may import ``adapters``,
``service`` and ``training``; none of those imports this package.
"""

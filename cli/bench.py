"""``aat bench``: benchmarks, one subcommand each (``aat bench serve``; more join here).

A benchmark module exposes ``register_<name>_bench(bench_subparsers)``, which adds its parser
and sets ``func``; add it to ``_registrars`` below.
"""

from __future__ import annotations

import argparse


def _registrars():
    from service.bench import register_serve_bench

    return (register_serve_bench,)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks",
                       description="Benchmarks that print their figures against a baseline "
                                   "measured in the same run (--json for scripts).")
    bench_sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for add in _registrars():
        add(bench_sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

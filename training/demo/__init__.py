"""The out-of-the-box demo: a corpus synthesized with espeak-ng and sox, a small AST pretrained
on it, and AAT task bundles for tasks whose labels the backbone never saw (``aat demo build``).

- ``corpus``: speech and sound synthesis, speaker-disjoint splits, folder-per-label layout.
- ``build``: pretraining, downstream training (aat_ms, head, full), evaluation, artifacts.
- ``report``: the mini Table 2 in ``docs/demo.md``.
"""

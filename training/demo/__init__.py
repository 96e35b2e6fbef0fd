"""The out-of-the-box demo: a corpus synthesized with espeak-ng and sox, a small AST pretrained
on it, and AAT task bundles for tasks whose labels the backbone never saw (``aat demo build``).

- ``corpus``: the word lists; writes the corpora in the folder-per-label layout.
- ``speakers``: espeak-ng voices, variants and notes, cut into speaker-disjoint splits.
- ``sounds``: the sox recipes of the synthetic sound classes and instruments.
- ``plan``: corpus definitions and every clip's parameters, fixed under a seed.
- ``render``: one clip through espeak-ng and sox; the tool checks.
- ``tasks``: the downstream tasks, methods and the targets the build must meet.
- ``build_config``: ``BuildConfig`` (every setting of the artifacts), presets, run recipes.
- ``build``: pretraining, downstream training (aat_ms, head, full), evaluation, artifacts.
- ``report``: the mini Table 2 in ``docs/demo.md``.
"""

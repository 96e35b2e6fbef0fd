"""Training: data sets in their official layouts, AST augmentation, the AAT recipes, a trainer
that writes task bundles, metrics and cross-validation."""

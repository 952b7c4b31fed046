"""Stages: each wires data + runtime + math + one artifact kind into a cached artifact (or a report).

A writing stage is a `driver.Stage` (see `base.WritingStage`): plan on the main rank, compute and
commit its units on every rank, publish. One module per command (fit_factors, build_query, index,
candidates, score, topk, layerwise, ...), and what several of them share:

  base        the writing stage's base class, the model check, per-item seeds
  growth      which corpus shards an artifact that grows is computed over
  loaders     curvatures, tracked modules and query gradients read from artifacts for the math
  index_rows  an index's identity, layout and rows (`index`, and the fit's fused index pass)

What an artifact is made from, and its fingerprint, is `infl.artifacts.Identity`.
"""

"""plan: what each stage would hold at its peak for a model, and what it writes, from the model's
config alone (the model is built on the meta device: no weights read, no corpus)."""

from __future__ import annotations

from infl import curvature, modeling, planning
from infl.config import PlanConfig

__all__ = ["run"]


def run(cfg: PlanConfig) -> dict:
    """The plan as plain data: the assumptions, then per stage its peak parts and totals."""
    context = modeling.context_length(cfg.model)
    length = context if cfg.max_length is None else cfg.max_length
    if length > context:
        from infl.errors import BadInput

        raise BadInput(f"--max-length {length} exceeds the model's context of {context} tokens")
    model = planning.skeleton(modeling.load_config(cfg.model), cfg.dtype)
    specs = modeling.tracked_modules(model, cfg.modules)
    strategy = curvature.get(cfg.strategy, cfg.blocks)
    shapes = [spec.shape for spec in specs]
    process = planning.process_bytes()  # this process has imported what a stage imports
    stages = planning.plan(
        model,
        strategy,
        shapes,
        cfg.dtype,
        cfg.batch_size,
        length,
        cfg.queries,
        cfg.rank,
        cfg.sequences,
        cfg.memory_budget,
        process,
    )
    return {
        "model": str(cfg.model),
        "modules": len(specs),
        "strategy": cfg.strategy,
        "blocks": cfg.blocks,
        "dtype": cfg.dtype,
        "batch_size": cfg.batch_size,
        "max_length": length,
        "queries": cfg.queries,
        "rank": cfg.rank,
        "sequences": cfg.sequences,
        "memory_budget": cfg.memory_budget,
        "stages": [
            {
                "stage": p.stage,
                "peak_bytes": p.footprint.total,
                "parts": p.footprint.parts,
                "disk_bytes": p.disk,
                "largest_batch": p.largest_batch,
                "partitions": p.partitions,
            }
            for p in stages
        ],
    }

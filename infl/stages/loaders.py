"""What the math takes, read from artifacts: the damped curvatures and tracked modules of a factors
artifact, and the preconditioned query gradients of a queries artifact."""

from __future__ import annotations

__all__ = ["Curvatures", "curvatures", "query_bank", "factors_module_specs"]


class Curvatures:
    """name -> damped Curvature of a factors artifact, read from it module by module when first
    asked for. Modules are kept while their bytes fit `budget` (None: all of them); the rest are
    read again at each use. A stage asks for the modules in the same order every batch, so keeping
    the first that fit (not the most recent) is what saves reads: an LRU cache would miss every time."""

    def __init__(self, factors, device: str = "cpu", budget: int | None = None):
        from infl import curvature

        self.factors, self.device, self.budget = factors, device, budget
        self.strategy = curvature.get(factors.config["strategy"])
        self.kept: dict = {}
        self.kept_bytes = 0
        self.reads = 0

    def __getitem__(self, name: str):
        if name in self.kept:
            return self.kept[name]
        import torch

        arrays = {
            k: torch.from_numpy(v).to(self.device)
            for k, v in self.factors.read_module(name, self.strategy.stored).items()
        }
        self.reads += 1
        found = self.strategy.curvature(arrays, float(self.factors.module_attrs(name)["damping"]))
        size = sum(t.numel() * t.element_size() for t in arrays.values())
        if self.budget is None or self.kept_bytes + size <= self.budget:
            self.kept[name], self.kept_bytes = found, self.kept_bytes + size
        return found


def curvatures(factors, device: str = "cpu", budget: int | None = None) -> Curvatures:
    """name -> damped Curvature, from a factors artifact, as its strategy stored it (read on
    first use; at most `budget` bytes of them kept)."""
    return Curvatures(factors, device, budget)


def factors_module_specs(factors) -> list:
    """The tracked modules recorded in a factors artifact (modeling.module_specs finds them in a model)."""
    from infl.capture import ModuleSpec

    return [ModuleSpec(**factors.spec(name)) for name in factors.modules]


def query_bank(queries, device: str = "cpu", rows: list[int] | None = None, expand_bytes: int = 1 << 30):
    """The preconditioned query gradients of a queries artifact (all, or `rows`) as a QueryBank,
    low-rank ones expanded within `expand_bytes`."""
    import torch

    from infl.scoring import QueryBank

    full, low_rank = {}, {}
    for name in queries.modules:
        arrays = {k: torch.from_numpy(v).to(device) for k, v in queries.preconditioned(name, rows).items()}
        if "P" in arrays:
            full[name] = arrays["P"]
        else:
            low_rank[name] = (arrays["U"], arrays["sigma"], arrays["V"])
    return QueryBank(queries.modules, full, low_rank, expand_bytes)

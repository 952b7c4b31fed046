"""How concentrated a query's influence is (paper Sec. 5.2.1, Figs. 8-9): the share of the total
positive influence held by the top 1 % and 10 % of sequences, and a maximum-likelihood power-law
fit of the top tail (Clauset, Shalizi and Newman's method, as the `powerlaw` package does it)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Sparsity", "top_shares", "power_law", "sparsity", "TAIL"]

TAIL = 2000  # the largest values the power law is fitted on: the xmin search costs O(n^2)


@dataclass(frozen=True)
class Sparsity:
    query_id: str
    n_sequences: int
    n_positive: int
    top_1: float  # share of the total positive influence held by the top 1 % of sequences
    top_10: float
    alpha: float  # the fitted density p(x) ~ x^-alpha above xmin (nan: too few positive values)
    xmin: float
    ks: float  # Kolmogorov-Smirnov distance between the tail and the fit
    n_tail: int  # values at or above xmin
    vs_exponential: tuple[float, float]  # log-likelihood ratio R (> 0 favours the power law) and its p-value
    vs_lognormal: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def top_shares(values: np.ndarray, fractions: tuple[float, ...] = (0.01, 0.1)) -> list[float]:
    """Per fraction f: the positive influence of the ceil(f N) most influential of N sequences
    over the positive influence of all N (nan when none is positive)."""
    positive = np.sort(np.clip(values[np.isfinite(values)], 0, None))[::-1]
    total = positive.sum()
    return [
        float(positive[: max(1, math.ceil(f * len(values)))].sum() / total) if total > 0 else math.nan
        for f in fractions
    ]


def power_law(values: np.ndarray, tail: int = TAIL) -> dict:
    """The power-law fit of the largest `tail` positive values: alpha, xmin, KS distance, how many
    values lie in the tail, and the likelihood-ratio tests against an exponential and a lognormal."""
    import powerlaw

    positive = np.sort(values[np.isfinite(values) & (values > 0)])[::-1][:tail]
    nan = {
        "alpha": math.nan,
        "xmin": math.nan,
        "ks": math.nan,
        "n_tail": 0,
        "vs_exponential": (math.nan, math.nan),
        "vs_lognormal": (math.nan, math.nan),
    }
    if len(np.unique(positive)) < 10:  # no tail to speak of
        return nan
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(positive, verbose=False, parameter_ranges={"alpha": (1.0, None)})  # its default stops at 3
        compare = {
            other: tuple(float(x) for x in fit.distribution_compare("power_law", other))
            for other in ("exponential", "lognormal")
        }
    return {
        "alpha": float(fit.alpha),
        "xmin": float(fit.xmin),
        "ks": float(fit.D),
        "n_tail": int((positive >= fit.xmin).sum()),
        "vs_exponential": compare["exponential"],
        "vs_lognormal": compare["lognormal"],
    }


def sparsity(query_id: str, values: np.ndarray, tail: int = TAIL) -> Sparsity:
    """One query's shares and power-law fit, from its scores over the whole corpus."""
    top_1, top_10 = top_shares(values)
    return Sparsity(query_id, len(values), int((values > 0).sum()), top_1, top_10, **power_law(values, tail))

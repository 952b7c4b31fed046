"""factors.zarr: per tracked module the curvature factors of one strategy, plus the running sums of
an unfinished fit.

Layout:
  attrs            kind, schema, config, provenance, fingerprint, modules, n_sequences, fit
  modules/<name>/  attrs d_in, d_out, bias, transposed, damping, n_tokens, n_sequences;
                   arrays as the strategy produced them: *_sum in float64 (a fit can be extended),
                   everything else (Q_A, eig_A, Q_S, eig_S, Lambda) in float32
  checkpoint/g<G>/r<R>/s<slot>/<module>/<key>   running sums of rank R in generation G

A fit passes over the corpus one or more times. During a pass every rank saves its running sums
after each chunk, in two alternating slots, and only then records in its own subgroup's attributes
which slot is current and which sequence ranges it has added: a rank killed at any moment leaves
a consistent state. A resumed pass (with any number of ranks) first merges every rank's state into
one state of the next generation, then switches the root attribute to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infl.artifacts import Artifact

__all__ = ["FactorsArtifact", "PassState"]

_SPEC_KEYS = ("d_in", "d_out", "bias", "transposed")


class PassState:
    """What a fit pass has added so far: sequence ranges [lo, hi), token count, sums per module."""

    def __init__(self, done: list[list[int]] | None = None, n_tokens: int = 0, sums: dict | None = None):
        self.done = _merge_ranges(done or [])
        self.n_tokens = n_tokens
        self.sums = sums  # module -> key -> np.ndarray, or None: start from zero

    def pending(self, n: int, chunk_size: int) -> list[tuple[int, int]]:
        """The sequence ranges not yet added, cut into chunks of at most `chunk_size`."""
        out, at = [], 0
        for lo, hi in [*self.done, [n, n]]:
            for start in range(at, min(lo, n), chunk_size):
                out.append((start, min(start + chunk_size, lo, n)))
            at = max(at, hi)
        return out


def _merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


class FactorsArtifact(Artifact):
    kind = "factors"

    def begin(self, specs: list[dict], n_sequences: int) -> None:
        """Record the tracked modules (their d_in, d_out, bias, transposed) of a new fit."""
        for spec in specs:
            self._sub(f"modules/{spec['name']}").attrs.update({k: spec[k] for k in _SPEC_KEYS})
        self.update_attrs({"modules": [s["name"] for s in specs], "n_sequences": n_sequences, "fit": {"finished": []}})

    @property
    def n_sequences(self) -> int:
        return int(self.group.attrs["n_sequences"])

    @property
    def started(self) -> bool:
        """Whether `begin` ran (a create killed before it leaves an artifact to start again)."""
        return "fit" in self.group.attrs

    # -- modules --------------------------------------------------------------------------------

    def module_attrs(self, name: str) -> dict:
        return dict(self.group[f"modules/{name}"].attrs)

    def spec(self, name: str) -> dict:
        at = self.group[f"modules/{name}"].attrs
        return {"name": name, **{k: at[k] for k in _SPEC_KEYS}}

    def write_module(self, name: str, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> None:
        """Write (or replace) some of a module's factors; only the module's owner calls this."""
        sub = self._sub(f"modules/{name}")
        if attrs:
            sub.attrs.update(attrs)
        for key, values in arrays.items():
            dtype = np.float64 if key.endswith("_sum") else np.float32
            self._write(key, np.asarray(values, dtype=dtype), where=sub)

    def read_module(self, name: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """A module's arrays (all, or those of `keys` that exist)."""
        sub = self.group[f"modules/{name}"]
        present = set(sub.array_keys())
        wanted = present if keys is None else [k for k in keys if k in present]
        return {k: self._read(f"modules/{name}/{k}") for k in wanted}

    # -- passes and checkpoints -----------------------------------------------------------------

    @property
    def finished_passes(self) -> list[str]:
        return list(self.group.attrs["fit"]["finished"])

    def finish_pass(self, name: str) -> None:
        fit = dict(self.group.attrs["fit"])
        self.update_attrs({"fit": {"finished": [*fit["finished"], name]}})

    def begin_pass(self, name: str) -> PassState:
        """Main rank, before a pass: merge what every rank of an earlier, killed run of this pass
        saved into one state (rank 0's, in a new generation) and return it; a fresh pass starts
        empty. Other ranks start from zero sums."""
        fit = dict(self.group.attrs["fit"])
        if fit.get("pass") != name:
            if "checkpoint" in self.group:
                del self.group["checkpoint"]
            self.update_attrs({"fit": {"finished": fit["finished"], "pass": name, "generation": 0}})
            self._sub("checkpoint/g0")
            return PassState()
        old = fit["generation"]
        merged = self._merged(old)
        new = old + 1
        if f"checkpoint/g{new}" in self.group:  # a merge killed before the switch below
            del self.group[f"checkpoint/g{new}"]
        self._sub(f"checkpoint/g{new}")
        if merged.sums is not None:
            self.save_progress(0, merged.sums, merged.done, merged.n_tokens, generation=new)
        self.update_attrs({"fit": {**fit, "generation": new}})  # the switch: from now on only g<new> counts
        del self.group[f"checkpoint/g{old}"]
        return merged

    def _merged(self, generation: int) -> PassState:
        states = []
        where = f"checkpoint/g{generation}"
        for rank_name, sub in (self.group[where].groups() if where in self.group else []):
            if "slot" in sub.attrs:
                states.append((rank_name, dict(sub.attrs)))
        if not states:
            return PassState()
        sums: dict = {}
        for rank_name, at in states:
            slot = self.group[f"{where}/{rank_name}/s{at['slot']}"]
            for module, keys in slot.groups():
                for key, array in keys.arrays():
                    values = np.asarray(array[...])
                    mine = sums.setdefault(module, {})
                    mine[key] = values if key not in mine else mine[key] + values
        done = [r for _, at in states for r in at["done"]]
        return PassState(done, sum(int(at["n_tokens"]) for _, at in states), sums)

    def save_progress(self, rank: int, sums: dict[str, dict[str, np.ndarray]], done: list, n_tokens: int,
                      generation: int | None = None) -> None:
        """A rank's running sums after a chunk: data to the slot not in use, then the pointer."""
        generation = self.group.attrs["fit"]["generation"] if generation is None else generation
        sub = self._sub(f"checkpoint/g{generation}/r{rank}")
        slot = 1 - int(sub.attrs.get("slot", 1))
        for module, keys in sums.items():
            where = self._sub(f"checkpoint/g{generation}/r{rank}/s{slot}/{module}")
            for key, values in keys.items():
                self._write(key, values, where=where)
        sub.attrs.update({"slot": slot, "done": _merge_ranges(done), "n_tokens": int(n_tokens)})

    def discard_checkpoints(self) -> None:
        """After COMPLETE: a kill while deleting leaves harmless leftovers, never a dangling slot."""
        if "checkpoint" in self.group:
            del self.group["checkpoint"]

    @classmethod
    def for_fit(cls, path: Path, attrs: dict, state: str):
        """The artifact a fit writes: the unfinished one to resume, or a new one."""
        if state == "partial":
            art = cls.open_for_writing(path)
            if art.started:
                return art
        return cls.create(path, attrs)

"""factors.zarr: per tracked module the curvature factors of one strategy, plus the running sums of
an unfinished fit.

Layout:
  attrs            kind, schema, config, provenance, fingerprint, modules, n_sequences, fit
  modules/<name>/  attrs d_in, d_out, bias, transposed, damping, n_tokens, n_sequences, fitted
                   (the passes whose results it holds, written after them);
                   arrays as the strategy produced them: running sums (*_sum) in the precision
                   they were kept in (A_sum, S_sum float64: see curvature.base.accumulate_dtype),
                   everything else (Q_A, eig_A, Q_S, eig_S, Lambda) in float32
  checkpoint/g<G>/r<R>/s<0|1>/  running sums of rank R in generation G: <module>/<key>, n_tokens, done

A fit passes over the corpus one or more times. During a pass every rank saves its running sums
after each chunk into one of two slots, alternating, each slot holding its sums, its token count
and the sequence ranges it has added (`done`, written last: a slot without it is incomplete): a
rank killed at any moment leaves its previous slot intact. A resumed pass (with any number of
ranks) first merges every rank's latest slot into one state of the next generation, then switches
the root attribute to it. With module partitions a pass is several sweeps, each over a subset of
the modules; the checkpoint belongs to one sweep (`fit.modules`) and each module records the passes
it finished, so a resumed fit skips what is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infl.artifacts import Artifact, _set_attrs, integrity
from infl.errors import IncompatibleArtifact

__all__ = ["FactorsArtifact", "PassState"]

_SPEC_KEYS = ("d_in", "d_out", "bias", "transposed")


class PassState:
    """What a fit pass has added so far: sequence ranges [lo, hi), token count, sums per module,
    and the checkpoint generation the ranks of this run save into."""

    def __init__(
        self, done: list[list[int]] | None = None, n_tokens: int = 0, sums: dict | None = None, generation: int = 0
    ):
        self.done = _merge_ranges(done or [])
        self.n_tokens = n_tokens
        self.sums = sums  # module -> key -> np.ndarray, or None: start from zero
        self.generation = generation

    def pending(self, n: int, chunk_size: int) -> list[tuple[int, int]]:
        """The sequence ranges not yet added, cut into chunks of at most `chunk_size`."""
        out, at = [], 0
        for lo, hi in [*self.done, [n, n]]:
            for start in range(at, min(lo, n), chunk_size):
                out.append((start, min(start + chunk_size, lo, n)))
            at = max(at, hi)
        return out


def _latest(art, rank_group):
    """The rank's valid slot that has added the most sequences (None if neither is valid)."""
    valid = []
    for name in ("s0", "s1"):
        if name in rank_group and "done" in rank_group[name]:
            slot = rank_group[name]
            try:
                done = art._read(f"{slot.path}/done")
            except IncompatibleArtifact:  # killed between `done` and its digest: not valid
                continue
            valid.append((int(np.diff(done, axis=1).sum()), slot))
    return max(valid, key=lambda v: v[0])[1] if valid else None


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
    command = "fit-factors"
    transient = ("checkpoint",)

    def begin(self, specs: list[dict], n_sequences: int) -> None:
        """Record the tracked modules (their d_in, d_out, bias, transposed) of a new fit."""
        for spec in specs:
            _set_attrs(self._sub(f"modules/{spec['name']}"), {k: spec[k] for k in _SPEC_KEYS})
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

    def write_module(
        self, name: str, arrays: dict[str, np.ndarray], attrs: dict | None = None, fitted: str | None = None
    ) -> None:
        """Write (or replace) some of a module's factors; only the module's owner calls this.
        `fitted`: the pass these arrays finish, recorded last (a kill before it redoes the module)."""
        sub = self._sub(f"modules/{name}")
        for key, values in arrays.items():
            # running sums in the precision they were kept in (the strategy's choice), the rest float32
            dtype = None if key.endswith("_sum") else np.float32
            self._write(key, np.asarray(values, dtype=dtype), where=sub)
        if attrs:
            _set_attrs(sub, attrs)
        if fitted is not None and fitted not in self.fitted(name):
            _set_attrs(sub, {"fitted": [*self.fitted(name), fitted]})

    def fitted(self, name: str) -> list[str]:
        """The passes whose results this module's arrays hold."""
        return list(self.group[f"modules/{name}"].attrs.get("fitted", []))

    def read_module(self, name: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """A module's arrays: those of `keys` that exist, or all but the running sums."""
        sub = self.group[f"modules/{name}"]
        present = {k for k in sub.array_keys() if not integrity.is_digest(k)}
        wanted = [k for k in present if not k.endswith("_sum")] if keys is None else [k for k in keys if k in present]
        return {k: self._read(f"modules/{name}/{k}") for k in wanted}

    # -- passes and checkpoints -----------------------------------------------------------------

    @property
    def finished_passes(self) -> list[str]:
        return list(self.group.attrs["fit"]["finished"])

    def finish_pass(self, name: str) -> None:
        fit = dict(self.group.attrs["fit"])
        self.update_attrs({"fit": {"finished": [*fit["finished"], name]}})

    def begin_pass(self, name: str, modules: list[str]) -> PassState:
        """Main rank, before a sweep of pass `name` over `modules` (a partition, or all of them):
        merge what every rank of an earlier, killed run of this sweep saved into one state (rank
        0's, in a new generation) and return it; a fresh sweep starts empty. Other ranks start
        from zero sums."""
        fit = dict(self.group.attrs["fit"])
        if fit.get("pass") != name or fit.get("modules", modules) != modules:
            if "checkpoint" in self.group:
                del self.group["checkpoint"]
            self.update_attrs({"fit": {"finished": fit["finished"], "pass": name, "modules": modules, "generation": 0}})
            self._sub("checkpoint/g0")
            return PassState(generation=0)
        old = fit["generation"]
        merged = self._merged(old)
        new = old + 1
        if f"checkpoint/g{new}" in self.group:  # a merge killed before the switch below
            del self.group[f"checkpoint/g{new}"]
        self._sub(f"checkpoint/g{new}")
        if merged.sums is not None:
            self.save_progress(0, new, merged.sums, merged.done, merged.n_tokens)
        self.update_attrs({"fit": {**fit, "generation": new}})  # the switch: from now on only g<new> counts
        del self.group[f"checkpoint/g{old}"]
        merged.generation = new
        return merged

    def _merged(self, generation: int) -> PassState:
        states = []
        where = f"checkpoint/g{generation}"
        for _, rank in self.group[where].groups() if where in self.group else []:
            slot = _latest(self, rank)
            if slot is not None:
                states.append(slot)
        if not states:
            return PassState()
        sums: dict = {}
        done, n_tokens = [], 0
        for slot in states:
            done += self._read(f"{slot.path}/done").tolist()
            n_tokens += int(self._read(f"{slot.path}/n_tokens")[0])
            for module, keys in slot.groups():
                for key in keys.array_keys():
                    if integrity.is_digest(key):
                        continue
                    values = self._read(f"{keys.path}/{key}")
                    mine = sums.setdefault(module, {})
                    mine[key] = values if key not in mine else mine[key] + values
        return PassState(done, n_tokens, sums)

    def save_progress(
        self, rank: int, generation: int, sums: dict[str, dict[str, np.ndarray]], done: list, n_tokens: int
    ) -> None:
        """A rank's running sums after a chunk, into the slot that does not hold its latest state.
        The slot is first marked invalid (its `done` removed), then filled, and `done` is written
        last: a slot is valid only once complete, whenever the rank is killed."""
        rank_group = self._sub(f"checkpoint/g{generation}/r{rank}")
        latest = _latest(self, rank_group)
        name = "s1" if latest is not None and latest.path.endswith("/s0") else "s0"
        slot = self._sub(f"checkpoint/g{generation}/r{rank}/{name}")
        for key in ("done", "n_tokens", "done" + integrity.SUFFIX, "n_tokens" + integrity.SUFFIX):
            if key in slot:
                del slot[key]
        for module, keys in sums.items():
            where = self._sub(f"checkpoint/g{generation}/r{rank}/{name}/{module}")
            for key, values in keys.items():
                self._write(key, values, where=where)
        self._write("n_tokens", np.asarray([n_tokens], dtype=np.int64), where=slot)
        self._write("done", np.asarray(_merge_ranges(done), dtype=np.int64).reshape(-1, 2), where=slot)

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

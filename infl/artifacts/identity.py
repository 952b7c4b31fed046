"""What an artifact is made from, and the one recipe of every fingerprint.

An `Identity` is an artifact kind's config (its options that can change results), its provenance
(the model, the parents by fingerprint, what does not grow) and its growing parts (corpus shards,
query files, the fingerprints of parents that grow, query blocks: those its kind declares in
`grows`). Its fingerprint covers all of them; its base fingerprint all but the growing parts, so
that an artifact made from the same base can grow instead of being rebuilt.

Where an input is (the model's directory, a parent's path: the `locations` and `parents` its kind
declares) is recorded, so that a reader can find it, and never fingerprinted, so that the same
inputs named another way, or moved, are the same. A file's own name is kept (`path` entries are
reduced to it): ids of records without one are derived from it (`name:line`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

__all__ = ["Identity", "jsonable", "fingerprint", "semantic_fields", "changed_keys", "without_locations"]

# The root attributes that say what an artifact was made from (the others say how far it got);
# a growing part named here is a root attribute, any other is a provenance entry.
IDENTITY = ("config", "provenance", "base_fingerprint", "query_blocks")


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy (paths to str, tuples to lists); NaN is refused, it is not JSON."""
    return json.loads(json.dumps(obj, default=str, allow_nan=False))


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()


def semantic_fields(cfg) -> dict:
    """The config fields of a stage's options that can change results (the others, like batch size
    or where a file is, are marked `semantic=False`)."""
    return {
        f.name: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
        for f in fields(cfg)
        if f.metadata.get("semantic", True)
        for v in [getattr(cfg, f.name)]
    }


def without_locations(kind, obj: Any) -> Any:
    """`obj` (attributes, or part of them) without what says where the inputs of a `kind` artifact
    are: its location entries dropped, `path` entries reduced to the file's name."""
    names = set(kind.locations) | set(kind.parents)

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: Path(v).name if k == "path" else strip(v)
                for k, v in value.items()
                if not (k in names and isinstance(v, str))
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(obj)


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (what made a fingerprint change)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


class Identity:
    """The config, provenance and growing parts of an artifact of `kind` (an Artifact class), and
    the root attributes they make (`attrs`: with base_fingerprint where the kind grows, and the
    fingerprint)."""

    def __init__(self, kind, config: dict, provenance: dict, parts: dict | None = None):
        self.kind, self.config, self.provenance, self.parts = kind, config, provenance, dict(parts or {})
        unknown = set(self.parts) - set(kind.grows)
        if unknown:
            raise ValueError(f"a {kind.kind} artifact does not grow by {sorted(unknown)}")

    @classmethod
    def of(cls, attrs: dict, kind=None) -> Identity:
        """The identity stored in an artifact's root attributes (`kind`: its class, by default
        the one its `kind` attribute names), its growing parts apart."""
        if kind is None:
            from infl.artifacts import kind_class

            kind = kind_class(attrs.get("kind"))
            if kind is None:
                raise ValueError(f"no artifact kind {attrs.get('kind')!r}")
        provenance = attrs.get("provenance", {})
        parts = {
            k: (attrs if k in IDENTITY else provenance)[k]
            for k in kind.grows
            if k in (attrs if k in IDENTITY else provenance)
        }
        return cls(kind, attrs.get("config", {}), {k: v for k, v in provenance.items() if k not in kind.grows}, parts)

    def grown(self, **parts) -> Identity:
        """The same base with these growing parts (corpus shards, query files, query blocks ...)."""
        return Identity(self.kind, self.config, self.provenance, {**self.parts, **parts})

    @property
    def base_fingerprint(self) -> str:
        """The fingerprint of all but the growing parts: what stays while the artifact grows."""
        return fingerprint(without_locations(self.kind, {"config": self.config, "provenance": self.provenance}))

    def covered(self) -> dict:
        """What the fingerprint covers: the identity attributes without locations."""
        attrs = self._attrs()
        return without_locations(self.kind, {k: attrs[k] for k in IDENTITY if k in attrs})

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.covered())

    @property
    def attrs(self) -> dict:
        """The root attributes that say what the artifact is made from, with its fingerprint."""
        return {**self._attrs(), "fingerprint": self.fingerprint}

    def _attrs(self) -> dict:
        grown = {k: self.parts[k] for k in self.kind.grows if k in self.parts}  # in the order the kind declares
        attrs = {
            "config": self.config,
            "provenance": {**self.provenance, **{k: v for k, v in grown.items() if k not in IDENTITY}},
        }
        if self.kind.grows:
            attrs["base_fingerprint"] = self.base_fingerprint
        return {**attrs, **{k: v for k, v in grown.items() if k in IDENTITY}}

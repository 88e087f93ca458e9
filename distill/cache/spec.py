"""What a teacher cache holds (``CacheSpec``) and the staleness check: a cache built with other settings
is an error naming every difference, never reused silently."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import h5py
import numpy as np

FORMAT_VERSION = 1
SCHEMES = ("topk", "sampled", "hybrid")
SPEC_FILE = "cache.json"


class StaleCacheError(RuntimeError):
    """The cache on disk was built with other settings than the ones asked for."""


@dataclass
class CacheSpec:
    """What a cache holds (docs/cache.md); two caches are interchangeable only if every field matches."""

    scheme: str = "topk"  # topk (exact head + tail bucket), sampled (draws, counts), hybrid (head + draws)
    k: int = 64  # head size for topk/hybrid; 0 for sampled
    n_draws: int = 0  # per position, for sampled (from the whole distribution) and hybrid (from the tail)
    teachers: list[dict[str, str]] = field(default_factory=list)  # ``name`` + what identifies its weights
    tokenizer_hash: str = ""
    vocab_size: int = 0  # the true vocabulary size, not the padded lm_head size
    temperature: float = 1.0  # of the draws; stored logits are always raw (temperature 1)
    template: str = ""  # chat template source (Jinja); texts over 256 characters by their SHA-256
    max_seq_length: int = 0
    labels: str = ""  # what decides the trainable positions: loss on responses only or all, truncation side
    value_bits: int = 6  # resolution of the cube-root head-value codes; 6: ~1.5e-4 nats KL when peaked
    # in the teacher's own terms (KD across tokenizers): tokenizer, vocabulary and template are the
    # teacher's, each position is stored with its place in the text; any student's training aligns them
    teacher_terms: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if (self.k > 0) == (self.scheme == "sampled"):
            raise ValueError(f"scheme {self.scheme!r} needs k {'== 0' if self.k > 0 else '> 0'}")
        if (self.n_draws > 0) != (self.scheme != "topk"):
            raise ValueError(f"scheme {self.scheme!r} needs n_draws {'> 0' if self.n_draws <= 0 else '== 0'}")
        if not 2 <= self.value_bits <= 16:
            raise ValueError("value_bits must be in [2, 16]")
        names = [t["name"] for t in self.teachers]
        if len(set(names)) != len(names) or any(not n or "/" in n for n in names):
            raise ValueError(f"teacher names must be unique, non-empty and without '/': {names}")
        self.teachers = [{str(k): str(v) for k, v in t.items()} for t in self.teachers]
        if len(self.template) > 256:  # attrs are small metadata; the text itself is not needed to compare
            self.template = "sha256:" + hashlib.sha256(self.template.encode()).hexdigest()

    def teacher(self, name: str) -> dict[str, str]:
        for t in self.teachers:
            if t["name"] == name:
                return t
        raise KeyError(f"teacher {name!r} is not in the cache spec ({[t['name'] for t in self.teachers]})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CacheSpec:
        return cls(**json.loads(text))

    def differences(self, cached: CacheSpec) -> list[str]:
        """Fields in which ``cached`` (on disk) differs from this (requested) spec. Teachers are compared
        by name: one the cache lacks is work to do, one the cache has with other weights is stale."""
        diffs = [
            f"{f.name}: cache has {getattr(cached, f.name)!r}, config asks for {getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name != "teachers" and getattr(cached, f.name) != getattr(self, f.name)
        ]
        wanted = {t["name"]: t for t in self.teachers}
        for t in cached.teachers:
            if t["name"] in wanted and wanted[t["name"]] != t:
                diffs.append(f"teachers[{t['name']}]: cache has {t}, config asks for {wanted[t['name']]}")
        return diffs


def raise_stale(diffs: Sequence[str]) -> None:
    if diffs:
        lines = "\n  ".join(dict.fromkeys(diffs))
        raise StaleCacheError(
            f"the teacher cache was built with other settings:\n  {lines}\n"
            "To delete it and collect again: `--data.init_args.rebuild_cache true` (KD fit) or "
            "`--trainer.callbacks.init_args.rebuild true` (collect), i.e. open_cache(..., rebuild=True)."
        )


def spec_from_attrs(f: h5py.File) -> CacheSpec:
    kw = {fl.name: f.attrs.get(fl.name, fl.default) for fl in fields(CacheSpec) if fl.name != "teachers"}
    kw = {k: v.item() if isinstance(v, np.generic) else v for k, v in kw.items()}
    return CacheSpec(**kw, teachers=json.loads(f.attrs["teachers"]))

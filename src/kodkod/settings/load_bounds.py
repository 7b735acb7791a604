"""The one declaration of the bounds of every numeric model-load parameter.

A load parameter reaches kodkod four ways: the config's `model` / `draft_model` sections (and
their CLI flags and environment variables, which are parsed by the same section models), the
`/v1/model/load` request, and a model folder's `tabby_config.yml`. All of them take their
bounds from `LOAD_BOUNDS`:

- the config sections and the load request annotate the field with the bounded type below
  (`MaxSeqLen`, …: `Annotated[int, bound.interval()]`; a violation is a config error naming the
  key, or a 422), and call `bound.check_multiple` in a validator for `multiple_of`;
- `models.loading` checks the merged `tabby_config.yml` values with `bound.check` (a 400).

One rule per key where the surfaces used to differ (TabbyAPI's documented rules win): `cache_size` is a
positive multiple of 256 everywhere (the load request used to take any positive number and round
it up), `rope_scale`/`draft_rope_scale` are positive in the config too, and `max_batch_size`
(1..256) and `draft_num_tokens` (1..32) have the load request's ceiling everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from annotated_types import Interval


@dataclass(frozen=True, slots=True)
class LoadBound:
    """Bounds of one numeric load parameter; `kind` is int or float."""

    name: str
    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    multiple_of: int | None = None

    def interval(self) -> Interval:
        """`ge`/`gt`/`le` as pydantic metadata (`Annotated[int, bound.interval()]`). With
        `multiple_of`, positivity is `check_multiple`'s (one message for both)."""
        if self.multiple_of is not None:
            return Interval(le=self.le)
        return Interval(ge=self.ge, gt=self.gt, le=self.le)

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        if self.multiple_of is not None:
            return f"a positive multiple of {self.multiple_of}"
        parts = [
            f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le)) if v is not None
        ]
        return f"{noun} {' and '.join(parts)}" if parts else noun

    def check_multiple(self, value: Any) -> Any:
        """The `multiple_of` rule alone (pydantic checks the rest); ValueError if broken."""
        if self.multiple_of is not None and value is not None and (value <= 0 or value % self.multiple_of):
            raise ValueError(f"expected a positive multiple of {self.multiple_of}, got {value}")
        return value

    def check(self, value: Any) -> int | float:
        """`value` (from YAML) type-checked and bounded; ValueError naming the key if not."""
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if not numeric or (self.kind is int and not isinstance(value, int)):
            raise ValueError(f"{self.name} must be {self.describe()}, not {value!r}")
        fits = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.multiple_of is None or (value > 0 and value % self.multiple_of == 0))
        )
        if not fits:
            raise ValueError(f"{self.name} must be {self.describe()}, not {value!r}")
        return self.kind(value)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


B = LoadBound
LOAD_BOUNDS: dict[str, LoadBound] = {
    b.name: b
    for b in (
        B("max_seq_len", int, ge=-1),
        B("cache_size", int, gt=0, multiple_of=256),
        B("chunk_size", int, gt=0),
        B("max_batch_size", int, ge=1, le=256),
        B("n_threads", int, ge=1),
        B("cpu_moe_offload_layers", int, ge=0),
        B("rope_scale", float, gt=0),
        B("draft_rope_scale", float, gt=0),
        B("draft_num_tokens", int, ge=1, le=32),
        B("ngram_match_min", int, ge=1),
    )
}


def _at(name: str) -> Interval:
    return LOAD_BOUNDS[name].interval()


# Field types carrying the bounds above (use as `MaxSeqLen | None`).
MaxSeqLen = Annotated[int, _at("max_seq_len")]
CacheSize = Annotated[int, _at("cache_size")]
ChunkSize = Annotated[int, _at("chunk_size")]
MaxBatchSize = Annotated[int, _at("max_batch_size")]
NThreads = Annotated[int, _at("n_threads")]
CpuMoeOffloadLayers = Annotated[int, _at("cpu_moe_offload_layers")]
RopeScale = Annotated[float, _at("rope_scale")]
DraftRopeScale = Annotated[float, _at("draft_rope_scale")]
DraftNumTokens = Annotated[int, _at("draft_num_tokens")]
NgramMatchMin = Annotated[int, _at("ngram_match_min")]

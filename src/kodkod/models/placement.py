"""Where a model's layers go: the GPU fields of a load → llama.cpp split options, or notes.

The GPU fields (`Use.GPU` rows of `settings.load_table`: `gpu_split`, `gpu_split_auto`,
`tensor_parallel`, `tensor_parallel_backend`, `autosplit_reserve`, `cpu_moe_offload_layers`,
`draft_gpu_split`) are accepted on every surface. A split cannot change what is computed, only
where, so:

- with no devices to split over (a CPU build of llama.cpp) nothing is placed: each field set
  to something other than its default gives one note saying it was ignored and why;
- with devices: `tensor_parallel` → row split, `gpu_split` (GB per device) → layer split in
  those proportions (`tensor_split`), `gpu_split_auto` → layer split by free memory, and
  `gpu_split_auto: false` without a split → one device. Fields llama.cpp has no counterpart
  for (`autosplit_reserve`, `tensor_parallel_backend`, `cpu_moe_offload_layers`,
  `draft_gpu_split`) are noted and ignored.
- with `rpc_servers` (llama.cpp RPC workers): the devices are this machine's CPU and the
  workers, whatever the build has; `gpu_split` gives one amount per device, local CPU first
  (default: equal shares), and the load notes each device's share. The other GPU fields are
  noted and ignored (RPC layers are split by layer, in those proportions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kodkod.models.params import GpuPlacement, LoadParamError
from kodkod.settings.load_param import LoadParam, Section, Use
from kodkod.settings.load_table import BY_NAME, rows

_NO_COUNTERPART = {
    "autosplit_reserve": "llama.cpp splits by free memory; set each device's share with gpu_split",
    "tensor_parallel_backend": "llama.cpp moves tensors between devices itself",
    "cpu_moe_offload_layers": "kodkod's llama.cpp backend keeps every expert with its layer",
    "draft_gpu_split": "the draft model is split like the main model",
}


def tensor_split(gpu_split_gb: Sequence[float]) -> tuple[float, ...]:
    """GB per device → llama.cpp `tensor_split` proportions (summing to 1; a 0 leaves that
    device unused). LoadParamError when no device gets a positive amount."""
    amounts = [float(x) for x in gpu_split_gb]
    if any(x < 0 for x in amounts):
        raise LoadParamError("gpu_split values must not be negative")
    total = sum(amounts)
    if total <= 0:
        raise LoadParamError("gpu_split must give at least one device a positive amount")
    return tuple(x / total for x in amounts)


def show(value: Any) -> str:
    """A value as a config file would spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def ignored_note(row: LoadParam, value: Any, why: str) -> str:
    return f"{row.name}: {show(value)} ignored: {why}"


def gpu_placement(
    model: Mapping[str, Any], draft: Mapping[str, Any], *, devices_available: bool
) -> tuple[GpuPlacement | None, list[str]]:
    """(split options or None, notes) for the merged `model` and `draft_model` values."""
    gpu_rows = (*rows(Section.MODEL, use=Use.GPU), *rows(Section.DRAFT, use=Use.GPU))
    values = {
        r.name: (draft if r.section is Section.DRAFT else model).get(r.name, r.default) for r in gpu_rows
    }
    set_rows = [r for r in gpu_rows if r.needs_note(values[r.name])]
    rpc_servers = tuple(values["rpc_servers"] or ())
    if rpc_servers:
        return rpc_placement(rpc_servers, list(values["gpu_split"] or []), set_rows, values)
    if not devices_available:
        return None, [ignored_note(r, values[r.name], r.note) for r in set_rows]
    notes = [
        ignored_note(r, values[r.name], _NO_COUNTERPART[r.name])
        for r in set_rows
        if r.name in _NO_COUNTERPART
    ]
    split = list(values["gpu_split"] or [])
    if values["tensor_parallel"]:
        return GpuPlacement("row", tensor_split(split) if split else ()), notes
    if split:
        return GpuPlacement("layer", tensor_split(split)), notes
    auto = values["gpu_split_auto"]
    return GpuPlacement("layer" if auto is None or auto else "none"), notes


def rpc_placement(
    rpc_servers: tuple[str, ...], split_gb: list[float], set_rows: list[LoadParam], values: dict[str, Any]
) -> tuple[GpuPlacement, list[str]]:
    """Layers over the local CPU and the RPC workers: (placement, one note per device + notes
    for the GPU fields that do not apply)."""
    n_devices = 1 + len(rpc_servers)
    if split_gb and len(split_gb) != n_devices:
        raise LoadParamError(
            f"gpu_split has {len(split_gb)} entries for {n_devices} devices (this machine's CPU "
            f"and {len(rpc_servers)} RPC worker(s)): give one amount per device, local CPU first"
        )
    shares = tensor_split(split_gb) if split_gb else tuple(1.0 / n_devices for _ in range(n_devices))
    why = "with rpc_servers the layers are split over the CPU and the workers by gpu_split"
    notes = [ignored_note(r, values[r.name], why) for r in set_rows if r.name != "gpu_split"]
    names = ("this machine's CPU", *(f"RPC worker {e}" for e in rpc_servers))
    notes += [
        f"rpc_servers: {n} holds {share:.0%} of the layers" for n, share in zip(names, shares, strict=True)
    ]
    return GpuPlacement("layer", shares, rpc_servers), notes


GPU_FIELDS = frozenset(n for n, r in BY_NAME.items() if r.use is Use.GPU)

"""Where a server's step time goes: kodkod's per-step debug log and per-thread CPU time.

Used by benchmarks/chat_sessions.py (`--step-log DIR`, `--kv-debug`):

* `step_log_env(dir, kv_debug)`: environment for a kodkod server process that turns on the
  engine's per-step debug lines (logger `kodkod.engine.steps`: kind, decode rows, prompt
  chunks, tokens, wall time in `llama_decode` and in the whole step, the engine thread's CPU
  time in it) through a `sitecustomize` module, and with `kv_debug` llama.cpp's own KV debug
  lines (`LLAMA_KV_CACHE_DEBUG=1`: before each ubatch, the highest occupied cell + 1 — the
  attention range every query of the ubatch visits — and the cells in use). The KV lines cost
  a few Python callbacks per step: take timings from a run without them.
* `summarize_step_log(text)`: steps by kind with their rows, prompt tokens and mean times, the
  engine thread's time off the CPU inside steps, and the attention range against live cells.
* `thread_cpu(pid)` / `cpu_table(before, after, wall_s)`: CPU seconds per thread of a process
  over a round, from /proc (Linux), to see what else competes with llama.cpp's threads.
"""

from __future__ import annotations

import os
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SITECUSTOMIZE = '''"""kodkod benchmark: engine step log on (benchmarks/step_log.py)."""
import logging

logging.getLogger("kodkod.engine.steps").setLevel(logging.DEBUG)
logging.getLogger("kodkod.backends.llamacpp.model").setLevel(logging.DEBUG)  # llama.cpp's lines
'''

_STEP = re.compile(
    r"step kind=(\w+) rows=(\d+) chunks=(\d+) tokens=(\d+) prompt_tokens=(\d+) "
    r"decode_ms=([\d.]+) step_ms=([\d.]+) cpu_ms=([\d.]+)"
)
_FIND_SLOT = re.compile(r"find_slot: stream\[\d+\], n = +(\d+), used = +(\d+)")


def step_log_env(directory: Path, kv_debug: bool, python_path: str) -> dict[str, str]:
    """Environment additions for a kodkod process whose engine logs every step."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    env = {"PYTHONPATH": f"{directory}:{python_path}" if python_path else str(directory)}
    if kv_debug:
        env["LLAMA_KV_CACHE_DEBUG"] = "1"
    return env


@dataclass(slots=True)
class Step:
    kind: str
    rows: int
    chunks: int
    tokens: int
    prompt_tokens: int
    decode_ms: float
    step_ms: float
    cpu_ms: float
    ranges: list[tuple[int, int]] = field(default_factory=list)  # per ubatch: (n_kv cells, used)


def parse_steps(text: str) -> list[Step]:
    """Steps in log order; llama.cpp's find_slot lines belong to the step logged after them."""
    steps: list[Step] = []
    pending: list[tuple[int, int]] = []
    for line in text.splitlines():
        m = _FIND_SLOT.search(line)
        if m:
            pending.append((int(m[1]), int(m[2])))
            continue
        m = _STEP.search(line)
        if m:
            counts = [int(m[i]) for i in range(2, 6)]
            times = [float(m[i]) for i in range(6, 9)]
            steps.append(Step(m[1], *counts, *times, ranges=pending))
            pending = []
    return steps


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))] if values else float("nan")


def _kind_line(kind: str, group: list[Step], total_ms: float) -> str:
    mean = statistics.fmean
    share = 100 * sum(s.step_ms for s in group) / total_ms
    prompt = mean(s.prompt_tokens for s in group)
    decode, step = mean(s.decode_ms for s in group), mean(s.step_ms for s in group)
    off_cpu = mean(max(0.0, s.step_ms - s.cpu_ms) for s in group)
    rows = mean(s.rows for s in group)
    return (
        f"{kind:8s} {len(group):5d} steps ({share:4.1f} % of step time): rows {rows:4.1f}, "
        f"prompt tokens {prompt:6.1f} (max {max(s.prompt_tokens for s in group)}), decode {decode:6.1f} ms "
        f"(p50 {_pct([s.decode_ms for s in group], 0.5):6.1f}), step {step:6.1f} ms, outside decode "
        f"{step - decode:5.2f} ms, engine thread off-CPU {off_cpu:5.2f} ms"
    )


def _range_lines(steps: list[Step]) -> list[str]:
    n_kv = [max(r[0] for r in s.ranges) for s in steps]
    used = [max(r[1] for r in s.ranges) for s in steps]
    ratio = [a / max(1, b) for a, b in zip(n_kv, used, strict=True)]
    out = [
        f"attention range (highest occupied cell + 1, before the ubatch) over {len(steps)} steps: "
        f"p50 {_pct(n_kv, 0.5):.0f} p90 {_pct(n_kv, 0.9):.0f} max {max(n_kv)} cells; cells in use "
        f"p50 {_pct(used, 0.5):.0f} max {max(used)}; range / used p50 {_pct(ratio, 0.5):.2f} "
        f"p90 {_pct(ratio, 0.9):.2f}"
    ]
    for lo, hi in ((0, 4096), (4096, 8192), (8192, 12288), (12288, 1 << 30)):
        sel = [s for s, n in zip(steps, n_kv, strict=True) if lo <= n < hi and s.kind == "decode"]
        if sel:
            rows = statistics.fmean(s.rows for s in sel)
            decode = statistics.fmean(s.decode_ms for s in sel)
            label = f"{lo}-{hi}" if hi < 1 << 30 else f">= {lo}"
            out.append(f"  decode steps, range {label}: {len(sel)}, rows {rows:4.1f}, decode {decode:.1f} ms")
    return out


def summarize_step_log(text: str) -> str:
    steps = parse_steps(text)
    if not steps:
        return "    (no step lines: was the step log on?)"
    by_kind: dict[str, list[Step]] = defaultdict(list)
    for s in steps:
        by_kind[s.kind].append(s)
    total_ms = sum(s.step_ms for s in steps)
    out = [_kind_line(kind, group, total_ms) for kind, group in sorted(by_kind.items())]
    ranged = [s for s in steps if s.ranges]
    if ranged:
        out += _range_lines(ranged)
    return "\n".join(f"    {line}" for line in out)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid` (Linux /proc; {} elsewhere)."""
    out: dict[int, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def cpu_table(pid: int, before: dict[int, float], after: dict[int, float], wall_s: float) -> str:
    """Per-thread CPU over a round: the main thread (tid = pid) apart, the others by CPU."""
    delta = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    total = sum(delta.values())
    main = delta.get(pid, 0.0)
    others = sorted((v for tid, v in delta.items() if tid != pid), reverse=True)
    top = ", ".join(f"{v:.1f}" for v in others[:4])
    return (
        f"process CPU {total:.1f} s over {wall_s:.1f} s wall ({total / wall_s:.2f} cores); main thread "
        f"{main:.1f} s; busiest other threads {top} s ({len(others)} threads)"
    )

"""`ChildBackend` against the in-process `LlamaCppBackend` on the default model (no workers: the
child loads on the local CPU, which is the same code path minus the RPC devices).

What it shows: the child's logits and the samplers running in this process give exactly the
tokens of an in-process load (greedy and seeded sampling with penalties and DRY), KV save and
restore cross the boundary, a child that dies turns every later call into BackendLostError
and is reaped, close() ends the child cleanly, and a child whose server was killed ends too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kodkod.backends.llamacpp.backend import LlamaCppBackend
from kodkod.backends.rpc_child.backend import ChildBackend
from kodkod.core.backend_types import BackendLostError, BatchRow, ContextConfig, ModelInfo, ModelSource
from kodkod.core.types import SamplingParams

pytestmark = pytest.mark.model

PROMPT = "Once upon a time, in a quiet village by the sea,"
STEPS = 24


def config(_info: ModelInfo) -> ContextConfig:
    return ContextConfig(cache_size=512, num_slots=2, batch_tokens=64, n_threads=1)


@pytest.fixture(scope="module")
def local(default_gguf: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend.load(ModelSource(default_gguf, "local"), config)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def child(default_gguf: Path) -> Iterator[ChildBackend]:
    backend = ChildBackend.load(ModelSource(default_gguf, "child"), config)
    yield backend
    backend.close()


def generate(backend: LlamaCppBackend | ChildBackend, params: SamplingParams) -> list[int]:
    """STEPS tokens in slot 0 from PROMPT (the slot is cleared first)."""
    backend.kv_clear()
    prompt = backend.tokenize(PROMPT, add_bos=True, parse_special=False)
    sampler = backend.new_sampler(params, prompt)
    out: list[int] = []
    try:
        [[index]] = backend.decode([BatchRow(0, prompt, 0, 1)])
        pos = len(prompt)
        for _ in range(STEPS):
            token = sampler.sample(index)
            out.append(token)
            [[index]] = backend.decode([BatchRow(0, [token], pos, 1)])
            pos += 1
    finally:
        sampler.close()
    return out


def test_the_child_gives_the_tokens_of_an_in_process_load(
    local: LlamaCppBackend, child: ChildBackend
) -> None:
    assert child.info.n_params == local.info.n_params and child.kv_capacity == local.kv_capacity
    assert child.tokenize(PROMPT, add_bos=True, parse_special=False) == local.tokenize(
        PROMPT, add_bos=True, parse_special=False
    )
    greedy = SamplingParams(temperature=0.0)
    assert generate(child, greedy) == generate(local, greedy)
    seeded = SamplingParams(
        temperature=0.9, top_k=40, min_p=0.02, repetition_penalty=1.1, dry_multiplier=0.8, seed=1234
    )
    assert generate(child, seeded) == generate(local, seeded)
    assert child.capabilities.adapters is None  # LoRA is not offered through the child
    assert child.capabilities.grammar is not None  # constraints run on this side's vocabulary


def test_logits_rows_are_the_in_process_rows_and_writable(
    local: LlamaCppBackend, child: ChildBackend
) -> None:
    rows = []
    for backend in (local, child):
        backend.kv_clear()
        prompt = backend.tokenize(PROMPT, add_bos=True, parse_special=False)
        # two slots in one batch: the rows come back in batch order
        idx = backend.decode([BatchRow(0, prompt, 0, 1), BatchRow(1, prompt[:5], 0, 2)])
        rows.append([backend.logits(i).copy() for ix in idx for i in ix])
        view = backend.logits(idx[0][0])
        view[0] = -1e30  # the engine edits rows in place (bans, masks)
        assert backend.logits(idx[0][0])[0] == np.float32(-1e30)
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows, strict=True):
        np.testing.assert_array_equal(a, b)


def test_kv_save_and_restore_cross_the_boundary(child: ChildBackend) -> None:
    out = generate(child, SamplingParams(temperature=0.0))  # slot 0: the prompt and `out`
    n = len(child.tokenize(PROMPT, add_bos=True, parse_special=False)) + len(out)
    data = child.kv_save(0)
    assert len(data) > 0
    child.kv_restore(1, data)  # the same KV in another slot
    idx = child.decode([BatchRow(0, [out[-1]], n, 1), BatchRow(1, [out[-1]], n, 1)])
    a, b = (child.logits(ix[0]) for ix in idx)
    assert int(a.argmax()) == int(b.argmax())
    np.testing.assert_allclose(a, b, atol=1e-2)


def test_a_child_that_dies_is_lost_and_reaped(default_gguf: Path) -> None:
    backend = ChildBackend.load(ModelSource(default_gguf, "doomed"), config)
    pid = backend.child_pid
    assert pid is not None
    try:
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(BackendLostError, match="was killed by SIGKILL"):
            backend.decode([BatchRow(0, [1, 2, 3], 0, 1)])
        assert not os.path.exists(f"/proc/{pid}")  # reaped, not a zombie
        with pytest.raises(BackendLostError, match="SIGKILL"):  # and so is every later call
            backend.kv_clear()
        assert backend.tokenize("still here", add_bos=False, parse_special=False)
    finally:
        backend.close()


def test_close_ends_the_child_cleanly(default_gguf: Path) -> None:
    backend = ChildBackend.load(ModelSource(default_gguf, "short"), config)
    pid = backend.child_pid
    assert pid is not None and os.path.exists(f"/proc/{pid}")
    backend.close()
    assert not os.path.exists(f"/proc/{pid}")
    backend.close()  # twice is fine


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_the_child_ends_when_the_server_process_is_killed(default_gguf: Path) -> None:
    """A server killed with SIGKILL cannot clean up: its child notices on its own."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from kodkod.backends.rpc_child.backend import ChildBackend\n"
        "from kodkod.core.backend_types import ContextConfig, ModelSource\n"
        "cfg = lambda _i: ContextConfig(cache_size=256, num_slots=1, batch_tokens=32, n_threads=1)\n"
        "b = ChildBackend.load(ModelSource(Path(sys.argv[1]), 'm'), cfg)\n"
        "print(b.child_pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", script, str(default_gguf)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert server.stdout is not None
        pid = int(server.stdout.readline())
        assert running(pid)
        server.kill()
        server.wait(10)
        deadline = time.monotonic() + 30
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(pid), "the engine child outlived its killed server"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def per_slot_config(_info: ModelInfo) -> ContextConfig:
    return ContextConfig(cache_size=1024, num_slots=4, batch_tokens=64, n_threads=1, kv_unified=False)


def test_per_slot_streams_through_the_child(default_gguf: Path) -> None:
    # one KV stream per slot: the child reports each slot's cells, rows given out of slot order
    # come back as the in-process rows of the same batch, and a prefix copied into another
    # slot's stream continues exactly as in the in-process backend
    local = LlamaCppBackend.load(ModelSource(default_gguf, "local-per-slot"), per_slot_config)
    child = ChildBackend.load(ModelSource(default_gguf, "child-per-slot"), per_slot_config)
    try:
        assert child.slot_cells == local.slot_cells == 256
        results = []
        for backend in (local, child):
            prompt = backend.tokenize(PROMPT, add_bos=True, parse_special=False)
            idx = backend.decode([BatchRow(3, prompt, 0, 1), BatchRow(1, prompt[:5], 0, 2)])
            rows = [backend.logits(i).copy() for ix in idx for i in ix]
            backend.kv_copy(3, 2, 0, 8)  # the first 8 positions of slot 3 into slot 2's stream
            [[i]] = backend.decode([BatchRow(2, prompt[8:], 8, 1)])
            rows.append(backend.logits(i).copy())
            results.append(rows)
        assert len(results[0]) == len(results[1]) == 4
        for a, b in zip(*results, strict=True):
            np.testing.assert_array_equal(a, b)
        # the continued copy computes what slot 3 computed for the same positions
        assert int(np.argmax(results[0][3])) == int(np.argmax(results[0][0]))
    finally:
        child.close()
        local.close()

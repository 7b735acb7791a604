"""Engine features beyond plain sampling, on the fake backend: banned strings (rewind and
resample), loop detection, classifier-free guidance pairs, token healing."""

from __future__ import annotations

import asyncio
from typing import Any

from kodkod.core.types import EosReason, FinishEvent, GenerationRequest, TokenEvent
from kodkod.engine.banned import BannedStringGuard, LoopDetector
from kodkod.engine.client import EngineClient
from kodkod.engine.loop import EngineConfig
from tests.fakes import FakeBackend


def collect_all(backend: FakeBackend, *reqs: GenerationRequest) -> list[tuple[list[str], Any, list[int]]]:
    async def main() -> list[tuple[list[str], Any, list[int]]]:
        client = EngineClient.start(backend, EngineConfig(max_seq_len=200, max_batch_size=4, chunk_size=8))
        try:
            out = []
            streams = [client.submit(r) for r in reqs]
            for s in streams:
                texts, ids, final = [], [], None
                async for ev in s:
                    if isinstance(ev, TokenEvent):
                        texts.append(ev.text)
                        ids.extend(ev.token_ids)
                    else:
                        final = ev
                out.append((texts, final, ids))
            return out
        finally:
            await client.shutdown()

    return asyncio.run(main())


def test_guard_holds_back_and_names_the_token_to_rewind() -> None:
    g = BannedStringGuard(["World"])
    assert g.feed(0, "Hel").text == "Hel"
    assert g.feed(1, "lo").text == "lo"
    r = g.feed(2, " Wor")  # " Wor" could become " World": held
    assert r.text == "" and r.rewind_to is None
    r = g.feed(3, "ld!")
    assert r.rewind_to == 2 and r.text == ""
    # after the rewind, the resampled continuation is released normally
    assert g.feed(2, " there").text == " there"


def test_guard_multibyte_tokens_rewind_to_the_first_byte() -> None:
    g = BannedStringGuard(["😀x"])
    assert g.feed(0, "a").text == "a"
    assert g.feed(1, "").text == ""  # first bytes of the emoji
    r = g.feed(2, "😀")
    assert r.text == ""  # could start "😀x"
    r = g.feed(3, "x")
    assert r.rewind_to == 1


def test_banned_string_never_reaches_the_client_and_is_resampled() -> None:
    # main path: 1 "The" → 2 " cat" → 3 " sat" ...; " cat" is banned, runner-up of 1 is 9 " dog"
    pieces = {1: b"The", 2: b" cat", 3: b" sat", 9: b" dog", 10: b" ran", 11: b"."}
    backend = FakeBackend(pieces=pieces, script={9: 10, 10: 11, 11: 0}, second={1: 9}, eos=0)
    [(texts, final, _ids)] = collect_all(
        backend, GenerationRequest("b", [5, 1], max_tokens=8, banned_strings=["cat"])
    )
    text = "".join(texts)
    assert "cat" not in text
    assert all("cat" not in t for t in texts)
    assert text == " dog ran."
    assert isinstance(final, FinishEvent) and final.eos_reason is EosReason.STOP_TOKEN
    # every KV write was contiguous (the fake asserts it), and the sampler was rebuilt, not leaked
    assert backend.live_samplers == 0


def test_loop_detector() -> None:
    d = LoopDetector(12, every=1)
    out: list[int] = []
    looping = False
    for t in [1, 2, 3, 4, 5] + [7, 8, 9] * 5:
        out.append(t)
        looping = d.add(out)
        if looping:
            break
    assert looping and len(out) >= 12 + 5 - 3
    d = LoopDetector(12, every=1)
    out = []
    for t in range(40):
        out = [*out, t]
        assert not d.add(out)


def test_loop_detection_stops_generation() -> None:
    backend = FakeBackend(script={5: 6, 6: 7, 7: 5}, eos=63)
    [(_, final, ids)] = collect_all(
        backend, GenerationRequest("l", [1, 4], max_tokens=150, loop_detect_window=30)
    )
    assert isinstance(final, FinishEvent) and final.eos_reason is EosReason.LOOP_DETECTED
    assert len(ids) < 60


def test_cfg_pairs_decode_together_and_mix_logits() -> None:
    backend = FakeBackend(eos=63)
    req = GenerationRequest("c", [10, 11, 12], max_tokens=5, cfg_scale=1.5, negative_prompt_ids=[30, 31])
    [(_, final, ids)] = collect_all(backend, req)
    assert isinstance(final, FinishEvent) and len(ids) == 5
    decode_batches = [b for b in backend.batches if all(r.num_logits == 1 for r in b)]
    assert decode_batches and all(len(b) == 2 for b in decode_batches)  # main + negative together
    # neg + 1.5 (pos - neg): the positive prompt's choice wins (10 vs. -5 for the negative's)
    assert ids[0] == 13
    assert backend.live_samplers == 0


def test_token_healing_regenerates_the_last_prompt_token() -> None:
    pieces = {20: b"Fra", 21: b"France", 22: b"Frank", 23: b" is", 24: b"nce"}
    # without healing the model would continue after "Fra" with 24 ("nce"); with healing the
    # last prompt token is dropped and the first token must start with "Fra"
    backend = FakeBackend(pieces=pieces, script={19: 21, 20: 24, 21: 23, 23: 0}, eos=0)
    [(texts, _final, ids)] = collect_all(
        backend, GenerationRequest("h", [19, 20], max_tokens=5, token_healing=True)
    )
    assert ids[0] == 21
    assert "".join(texts) == "nce is"

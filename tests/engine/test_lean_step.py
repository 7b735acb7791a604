"""The step's fast paths give what the general paths give: the shared token-text table of the
detokenizer, and emitting without stop strings (the numpy `llama_batch` and the logits view:
tests/backends/test_numpy_batch.py)."""

from __future__ import annotations

import asyncio
import codecs
import random
from typing import Any

from kodkod.core.types import EosReason, FinishEvent, FinishReason, GenerationRequest, TokenEvent
from kodkod.engine.client import EngineClient
from kodkod.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from kodkod.engine.loop import EngineConfig
from tests.fakes import FakeBackend

# byte-fallback style pieces: whole characters, and the bytes of multi-byte ones split apart
PIECES: dict[int, bytes] = {
    1: b"a",
    2: b" b",
    3: "é".encode(),
    4: "€".encode()[:1],  # first byte of a 3-byte character
    5: "€".encode()[1:],  # the other two
    6: "🙂".encode()[:2],
    7: "🙂".encode()[2:],
    8: b"\xff",  # never valid UTF-8
    9: "x€".encode()[:2],  # a whole character, then the first byte of another
    10: "日本".encode(),
    11: b"",
}


def _reference(tokens: list[int]) -> str:
    return b"".join(PIECES[t] for t in tokens).decode("utf-8", errors="replace")


def _stream(detok: IncrementalDetokenizer, tokens: list[int]) -> str:
    return "".join(detok.add(t) for t in tokens) + detok.flush()


def test_shared_text_table_gives_what_a_full_decode_gives() -> None:
    rng = random.Random(7)
    texts = TokenTexts()
    calls: list[int] = []

    def piece(t: int) -> bytes:
        calls.append(t)
        return PIECES[t]

    for _ in range(300):
        tokens = [rng.choice(list(PIECES)) for _ in range(rng.randint(0, 12))]
        assert _stream(IncrementalDetokenizer(piece, texts.table(True)), tokens) == _reference(tokens)
    # whole-character tokens are decoded once and then read from the table
    assert texts.special.keys() == {1, 2, 3, 10, 11}
    calls.clear()
    assert _stream(IncrementalDetokenizer(piece, texts.table(True)), [1, 2, 3, 10, 11]) == "a bé日本"
    assert calls == []


def test_a_character_split_across_tokens_waits_for_its_last_byte() -> None:
    detok = IncrementalDetokenizer(PIECES.__getitem__, {})
    assert detok.add(1) == "a"
    assert detok.add(4) == ""  # '€' is open
    assert detok.add(3) == "\ufffdé"  # its bytes did not continue: replaced, then the next one
    assert detok.add(9) == "x"
    assert detok.add(5) == "€"
    assert detok.add(6) == ""
    assert detok.add(1) == "\ufffda"
    assert detok.add(6) + detok.add(7) == "🙂"
    assert detok.add(4) == ""
    assert detok.flush() == "\ufffd"  # the end of the output releases what is pending


def test_two_sequences_sharing_a_table_keep_their_own_open_characters() -> None:
    texts: dict[int, str] = {}
    a = IncrementalDetokenizer(PIECES.__getitem__, texts)
    b = IncrementalDetokenizer(PIECES.__getitem__, texts)
    assert a.add(4) == "" and b.add(1) == "a"
    assert b.add(6) == "" and a.add(5) == "€"
    assert a.add(1) == "a" and b.add(7) == "🙂"


def test_restart_drops_an_open_character_and_keeps_the_table() -> None:
    texts: dict[int, str] = {}
    detok = IncrementalDetokenizer(PIECES.__getitem__, texts)
    assert detok.add(1) + detok.add(4) == "a"
    fresh = detok.restart()
    assert fresh.add(3) == "é" and fresh.flush() == ""
    assert texts == {1: "a", 3: "é"}


def test_decoding_matches_pythons_incremental_decoder_on_random_bytes() -> None:
    rng = random.Random(11)
    for _ in range(200):
        data = bytes(
            rng.choice(b"a\xc3\xa9\xe2\x82\xac\xf0\x9f\x99\x82\xff\x80") for _ in range(rng.randint(0, 20))
        )
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 4)))
        parts = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        pieces = dict(enumerate(parts))
        detok = IncrementalDetokenizer(pieces.__getitem__, {})
        expected = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i in pieces:
            assert detok.add(i) == expected.decode(pieces[i])
        assert detok.flush() == expected.decode(b"", final=True)


# -- emitting without stop strings ------------------------------------------------------------


def _run(requests: list[GenerationRequest], **backend_kw: Any) -> list[tuple[TokenEvent, FinishEvent]]:
    backend = FakeBackend(**backend_kw)

    async def main() -> list[tuple[TokenEvent, FinishEvent]]:
        client = EngineClient.start(backend, EngineConfig(max_seq_len=200, max_batch_size=4, chunk_size=8))
        try:
            out = await asyncio.gather(*(client.submit(r).collect() for r in requests))
            return [(t, f) for t, f in out if isinstance(f, FinishEvent)]
        finally:
            await client.shutdown("test over")

    return asyncio.run(main())


def test_without_stop_strings_eos_and_max_tokens_still_end_the_output() -> None:
    pieces = {0: b"<eos>", 4: "€".encode()[:1], 5: "€".encode()[1:]}
    (eos, length, banned) = _run(
        [
            GenerationRequest("eos", [1], max_tokens=50),  # 2 3 4 5 6 then EOS
            GenerationRequest("len", [2], max_tokens=3),  # 3 4 5 (the character completes at 5)
            GenerationRequest("ban", [1], max_tokens=8, ban_eos_token=True),  # 2..6, runner-up 1, 2, 3
        ],
        script={6: 0},
        pieces=pieces,
    )
    # (a token that only opens a character is reported with the one that completes it)
    assert eos[1].eos_reason is EosReason.STOP_TOKEN and eos[1].stop_str == "<eos>"
    assert eos[0].text == "<2><3>€<6>" and eos[1].usage.completion_tokens == 6
    assert length[1].reason is FinishReason.LENGTH and length[1].eos_reason is EosReason.MAX_NEW_TOKENS
    assert length[0].text == "<3>€" and length[1].usage.completion_tokens == 3
    assert banned[1].reason is FinishReason.LENGTH
    assert banned[0].text == "<2><3>€<6><8><9><10>" and banned[1].usage.completion_tokens == 8


def test_an_output_cut_inside_a_character_ends_with_a_replacement_character() -> None:
    ((tokens, final),) = _run(
        [GenerationRequest("cut", [2], max_tokens=2)], pieces={4: "€".encode()[:1], 5: "€".encode()[1:]}
    )
    assert final.reason is FinishReason.LENGTH
    assert tokens.text == "<3>\ufffd" and final.usage.completion_tokens == 2


def test_stop_strings_still_stop_beside_requests_without_them() -> None:
    plain, stopped = _run(
        [
            GenerationRequest("plain", [1], max_tokens=6),
            GenerationRequest("stop", [1], max_tokens=6, stop_strings=["<4>"]),
        ]
    )
    assert plain[0].text == "<2><3><4><5><6><7>" and plain[1].reason is FinishReason.LENGTH
    assert stopped[0].text == "<2><3>" and stopped[1].eos_reason is EosReason.STOP_STRING

"""Turning one logits row into one token and the events it causes.

`next_token()` runs the per-sequence stages the native chain can't (token masks, EOS bans
before `min_tokens`), samples, and records logprobs. `emit()` appends the token, detokenizes
it, checks stop tokens, stop strings and limits, and pushes the events. Both run on the engine
thread once per sampled token, so they stay small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kodkod.backends.base import Backend
from kodkod.engine.sequence import Sequence
from kodkod.engine.types import EosReason, FinishReason, TokenEvent, TokenLogprob

NEG_INF = np.float32(-np.inf)


@dataclass(slots=True)
class Finish:
    reason: FinishReason
    eos_reason: EosReason
    stop_str: str | None = None


def _token_text(backend: Backend, token_id: int) -> str:
    return backend.token_bytes(token_id, special=True).decode("utf-8", errors="replace")


def _logprob_info(
    backend: Backend, raw: np.ndarray, token_id: int, top_n: int
) -> TokenLogprob:
    m = float(raw.max())
    lse = m + math.log(float(np.exp(raw - m, dtype=np.float32).sum()))
    n = min(top_n, raw.shape[0])
    top: list[tuple[int, str, float]] = []
    if n > 0:
        top_ids = np.argpartition(raw, -n)[-n:]
        top_ids = top_ids[np.argsort(raw[top_ids])[::-1]]
        top = [(int(t), _token_text(backend, int(t)), float(raw[t]) - lse) for t in top_ids]
    return TokenLogprob(token_id, _token_text(backend, token_id), float(raw[token_id]) - lse, top)


def next_token(seq: Sequence, backend: Backend, index: int) -> tuple[int, TokenLogprob | None]:
    """Sample the next token of `seq` from the logits at batch `index`."""
    req = seq.request
    need_row = (
        req.logprobs is not None
        or req.processors
        or req.constraint is not None
        or req.ban_eos_token
        or seq.num_output < req.min_tokens
    )
    raw = None
    if need_row:
        row = backend.logits(index)
        if req.logprobs is not None:
            raw = row.copy()
        output_ids = seq.output_ids
        for proc in req.processors:
            proc.process(row, output_ids)
        if req.constraint is not None:
            req.constraint.process(row, output_ids)
        if req.ban_eos_token or seq.num_output < req.min_tokens:
            for t in seq.stop_ids:
                row[t] = NEG_INF
    assert seq.sampler is not None
    token = seq.sampler.sample(index)
    for proc in req.processors:
        proc.accept(token)
    if req.constraint is not None:
        req.constraint.accept(token)
    info = _logprob_info(backend, raw, token, req.logprobs or 0) if raw is not None else None
    return token, info


def emit(seq: Sequence, backend: Backend, token: int, info: TokenLogprob | None) -> Finish | None:
    """Append `token` to `seq`, push what is now safe to show, and say if generation ends."""
    req = seq.request
    seq.tokens.append(token)
    logprobs = [info] if info is not None else None
    if token in seq.stop_ids and seq.num_output > req.min_tokens - 1:
        tail = seq.detok.flush() + seq.stops.flush()
        if tail or logprobs:
            seq.sink.push(TokenEvent(tail, [token], logprobs))
        return Finish(FinishReason.STOP, EosReason.STOP_TOKEN, _token_text(backend, token))
    text = seq.detok.add(token) if not (req.skip_special_tokens and token in seq.stop_ids) else ""
    out, hit = seq.stops.feed(text)
    if hit is not None:
        if req.include_stop_str_in_output:
            out += hit
        seq.sink.push(TokenEvent(out, [token], logprobs))
        return Finish(FinishReason.STOP, EosReason.STOP_STRING, hit)
    if len(seq.tokens) >= seq.max_len:
        out += seq.detok.flush()
        out += seq.stops.flush()
        seq.sink.push(TokenEvent(out, [token], logprobs))
        return Finish(FinishReason.LENGTH, EosReason.MAX_NEW_TOKENS)
    if req.constraint is not None and req.constraint.is_done():
        out += seq.detok.flush() + seq.stops.flush()
        seq.sink.push(TokenEvent(out, [token], logprobs))
        return Finish(FinishReason.STOP, EosReason.CONSTRAINT_DONE)
    if out or logprobs:
        seq.sink.push(TokenEvent(out, [token], logprobs))
    return None

"""Turning one logits row into one token and the events it causes.

`next_token()` runs the per-sequence stages the native chain can't (CFG mixing, token masks,
position bans from banned-string rewinds, EOS bans before `min_tokens`), samples, and records
logprobs. `emit()` appends the token and passes its text through

    detokenizer → banned-string guard → stop-string matcher → event

checking stop tokens, loops and limits on the way; it returns a `Finish`, a `Rewind` (a banned
string appeared: the engine rolls back and resamples), or None. Both run on the engine thread
once per sampled token, so they stay small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kodkod.core.types import EosReason, FinishReason, TokenEvent, TokenLogprob
from kodkod.engine.backend import Backend
from kodkod.engine.sequence import Sequence

NEG_INF = np.float32(-np.inf)


@dataclass(slots=True)
class Finish:
    reason: FinishReason
    eos_reason: EosReason
    stop_str: str | None = None


@dataclass(slots=True)
class Rewind:
    output_index: int  # keep output tokens [0, output_index); ban the one that was there


def _token_text(backend: Backend, token_id: int) -> str:
    return backend.token_bytes(token_id, special=True).decode("utf-8", errors="replace")


def _logprob_info(backend: Backend, raw: np.ndarray, token_id: int, top_n: int) -> TokenLogprob:
    m = float(raw.max())
    lse = m + math.log(float(np.exp(raw - m, dtype=np.float32).sum()))
    n = min(top_n, raw.shape[0])
    top: list[tuple[int, str, float]] = []
    if n > 0:
        top_ids = np.argpartition(raw, -n)[-n:]
        top_ids = top_ids[np.argsort(raw[top_ids])[::-1]]
        top = [(int(t), _token_text(backend, int(t)), float(raw[t]) - lse) for t in top_ids]
    return TokenLogprob(token_id, _token_text(backend, token_id), float(raw[token_id]) - lse, top)


def next_token(
    seq: Sequence, backend: Backend, index: int, cfg_index: int | None = None
) -> tuple[int, TokenLogprob | None]:
    """Sample the next token of `seq` from the logits at batch `index`."""
    req = seq.request
    sampler = seq.sampler
    assert sampler is not None
    if (
        req.logprobs is None
        and not req.processors
        and req.constraint is None
        and cfg_index is None
        and not seq.bans
    ):
        # the common case: at most end-of-generation bans, then the sampler alone
        if len(seq.tokens) - seq.num_prompt < req.min_tokens:  # no stop token before min_tokens
            _ban(backend.logits(index), seq.stop_ids)
        elif req.ban_eos_token:  # only the model's end-of-generation tokens
            _ban(backend.logits(index), seq.eos_ids)
        return sampler.sample(index), None
    bans = seq.bans.get(seq.num_output) if seq.bans else None
    need_row = (
        req.logprobs is not None
        or req.processors
        or req.constraint is not None
        or req.ban_eos_token
        or seq.num_output < req.min_tokens
        or bans
        or cfg_index is not None
    )
    raw = None
    if need_row:
        row = backend.logits(index)
        if cfg_index is not None:  # classifier-free guidance: neg + scale · (pos − neg)
            neg = backend.logits(cfg_index)
            scale = np.float32(req.cfg_scale)
            row[:] = neg + scale * (row - neg)
        if req.logprobs is not None:
            raw = row.copy()
        output_ids = seq.output_ids
        for proc in req.processors:
            proc.process(row, output_ids)
        if req.constraint is not None:
            req.constraint.process(row, output_ids)
        if seq.num_output < req.min_tokens:  # no stop token before min_tokens
            _ban(row, seq.stop_ids)
        elif req.ban_eos_token:  # only the model's end-of-generation tokens
            _ban(row, seq.eos_ids)
        if bans:
            row[list(bans)] = NEG_INF
    token = sampler.sample(index)
    for proc in req.processors:
        proc.accept(token)
    if req.constraint is not None:
        req.constraint.accept(token)
    info = _logprob_info(backend, raw, token, req.logprobs or 0) if raw is not None else None
    return token, info


def _ban(row: np.ndarray, token_ids: frozenset[int]) -> None:
    for t in token_ids:
        row[t] = NEG_INF


def _flush(seq: Sequence) -> str:
    text = seq.detok.flush()
    if seq.guard is not None:
        text = seq.guard.flush() + text if text else seq.guard.flush()
    out, _ = seq.stops.feed(text) if text else ("", None)
    return out + seq.stops.flush()


def emit(seq: Sequence, backend: Backend, token: int, info: TokenLogprob | None) -> Finish | Rewind | None:
    """Append `token` to `seq`, push what is now safe to show, and say what happens next."""
    req = seq.request
    tokens = seq.tokens
    tokens.append(token)
    logprobs = [info] if info is not None else None
    if token in seq.stop_ids:
        if len(tokens) - seq.num_prompt >= req.min_tokens:
            tail = _flush(seq)
            if tail or logprobs:
                seq.sink.push(TokenEvent(tail, [token], logprobs))
            return Finish(FinishReason.STOP, EosReason.STOP_TOKEN, _token_text(backend, token))
        text = "" if req.skip_special_tokens else seq.detok.add(token)
    else:
        text = seq.detok.add(token)
    if seq.strip_prefix:
        text = _strip_healed(seq, text)
    if seq.guard is not None:
        guarded = seq.guard.feed(seq.num_output - 1, text)
        if guarded.rewind_to is not None:
            if guarded.text:
                out, hit = seq.stops.feed(guarded.text)
                if out:
                    seq.sink.push(TokenEvent(out, [], None))
                if hit is not None:
                    return Finish(FinishReason.STOP, EosReason.STOP_STRING, hit)
            return Rewind(guarded.rewind_to)
        text = guarded.text
    if seq.stops.active:
        out, hit = seq.stops.feed(text)
        if hit is not None:
            if req.include_stop_str_in_output:
                out += hit
            seq.sink.push(TokenEvent(out, [token], logprobs))
            return Finish(FinishReason.STOP, EosReason.STOP_STRING, hit)
    else:  # no stop strings: nothing to scan or hold back
        out = text
    finish: Finish | None = None
    if len(tokens) >= seq.max_len:
        finish = Finish(FinishReason.LENGTH, EosReason.MAX_NEW_TOKENS)
    elif req.constraint is not None and req.constraint.is_done():
        finish = Finish(FinishReason.STOP, EosReason.CONSTRAINT_DONE)
    elif seq.loops is not None and seq.loops.add(seq.output_ids):
        finish = Finish(FinishReason.STOP, EosReason.LOOP_DETECTED)
    if finish is not None:
        out += _flush(seq)
        seq.sink.push(TokenEvent(out, [token], logprobs))
        return finish
    if out or logprobs:
        seq.sink.push(TokenEvent(out, [token], logprobs))
    return None


def _strip_healed(seq: Sequence, text: str) -> str:
    """Token healing: the first output re-creates the removed prompt text; don't repeat it."""
    prefix = seq.strip_prefix
    if text.startswith(prefix):
        seq.strip_prefix = ""
        return text[len(prefix) :]
    if prefix.startswith(text):
        seq.strip_prefix = prefix[len(text) :]
        return ""
    seq.strip_prefix = ""
    return text

"""Speculative decoding: drafts (a draft model or n-gram lookups) verified in the batched decode.

state.py       SpecConfig (draft_model section) and per-sequence SpecState
ngram.py       NgramIndex: what followed the sequence's tail the last time it appeared
policy.py      measured costs and acceptance → how many tokens to draft this step
speculator.py  Speculator: per-step drafting for a decode plan, the draft model's KV mirror
verify.py      verification: sample each drafted position with the full pipeline, accept
               while the sample equals the draft
acceptance.py  the general speculative-sampling rule (min(1, p/q), residual resampling)
"""

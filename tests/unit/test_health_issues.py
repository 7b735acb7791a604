"""/health's issues: a fatal fault makes the server unhealthy until a model loads again."""

from __future__ import annotations

from kodkod.api.state import HealthIssue, split_issues


def test_issues_before_the_current_model_loaded_are_resolved() -> None:
    old = HealthIssue("t1", "EngineDead: llama_decode failed", at=100.0)
    new = HealthIssue("t3", "EngineStalled: step running for 301 s", at=300.0)
    assert split_issues([old, new], loaded_at=200.0) == ([new], [old])
    assert split_issues([old], loaded_at=None) == ([old], [])  # no model: still unhealthy
    assert split_issues([old], loaded_at=50.0) == ([old], [])  # the engine that failed is current

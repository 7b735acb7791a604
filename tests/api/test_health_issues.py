"""/health's issues: a fatal fault makes the server unhealthy until a model loads again."""

from __future__ import annotations

from kodkod.api.state import HEALTH_ISSUES_KEPT, HealthIssue, HealthLog, split_issues


def test_issues_before_the_current_model_loaded_are_resolved() -> None:
    old = HealthIssue("t1", "EngineDead: llama_decode failed", at=100.0)
    new = HealthIssue("t3", "EngineStalled: step running for 301 s", at=300.0)
    assert split_issues([old, new], loaded_at=200.0) == ([new], [old])
    assert split_issues([old], loaded_at=None) == ([old], [])  # no model: still unhealthy
    assert split_issues([old], loaded_at=50.0) == ([old], [])  # the engine that failed is current


def test_the_health_log_names_the_fault_and_keeps_the_newest() -> None:
    log = HealthLog()
    for i in range(HEALTH_ISSUES_KEPT + 5):
        log.record_fatal(RuntimeError(f"fault {i}"))
    assert len(log.issues) == HEALTH_ISSUES_KEPT
    assert log.issues[-1].description == f"RuntimeError: fault {HEALTH_ISSUES_KEPT + 4}"
    current, resolved = log.split(loaded_at=None)
    assert current == log.issues and resolved == []

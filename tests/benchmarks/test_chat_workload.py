"""The chat_sessions benchmark's workload: seeded, histories that grow, idle users, one
user who regenerates, and messages rebuilt from the replies a server gave."""

from __future__ import annotations

import pytest
from benchmarks.chat_workload import make_workload, messages_for


def test_same_seed_same_workload_other_seed_other_text() -> None:
    assert make_workload(7) == make_workload(7)
    a, b = make_workload(7), make_workload(8)
    assert [t.user_text for s in a.sessions for t in s.turns] != [
        t.user_text for s in b.sessions for t in s.turns
    ]


def test_eight_users_six_turns_plus_one_regenerating_user() -> None:
    w = make_workload(0)
    assert len(w.sessions) == 9
    assert all(len(s.turns) == 6 for s in w.sessions)
    regenerating = [s for s in w.sessions if s.regenerates]
    assert [s.user_id for s in regenerating] == [8]
    assert all(t.regenerations == 2 for t in regenerating[0].turns)
    assert w.num_requests == 8 * 6 + 6 * 3


def test_some_users_idle_between_turns_never_before_the_first() -> None:
    w = make_workload(0)
    idle_users = {s.user_id for s in w.sessions if any(t.idle_before_s > 0 for t in s.turns)}
    assert len(idle_users) == 3
    assert all(s.turns[0].idle_before_s == 0 for s in w.sessions)
    assert all(0 <= t.idle_before_s <= 8.0 for s in w.sessions for t in s.turns)


def test_history_grows_each_turn_and_keeps_earlier_messages_unchanged() -> None:
    w = make_workload(3)
    session = w.sessions[0]
    replies = [f"reply {k} " + "word " * 100 for k in range(6)]
    previous = messages_for(w, session, 0, [])
    assert previous[0] == {"role": "system", "content": w.system_prompt}
    sizes = [sum(len(m["content"]) for m in previous)]
    for k in range(1, 6):
        current = messages_for(w, session, k, replies[:k])
        assert current[: len(previous)] == previous  # the earlier history is resent unchanged
        assert current[len(previous)] == {"role": "assistant", "content": replies[k - 1]}
        sizes.append(sum(len(m["content"]) for m in current))
        previous = current
    assert sizes == sorted(sizes) and len(set(sizes)) == 6
    # ~1,500 tokens by the last turn: system + 6 user messages of ~80 words + 5 replies
    words = sum(len(m["content"].split()) for m in previous)
    assert 800 < words < 1400


def test_users_share_the_system_prompt_and_differ_in_their_messages() -> None:
    w = make_workload(0)
    firsts = [messages_for(w, s, 0, []) for s in w.sessions]
    assert len({m[0]["content"] for m in firsts}) == 1
    assert len({m[1]["content"] for m in firsts}) == len(firsts)


def test_a_turn_needs_its_earlier_replies() -> None:
    w = make_workload(0)
    with pytest.raises(ValueError, match="3 earlier replies"):
        messages_for(w, w.sessions[0], 3, ["only one"])

"""The seeded multi-user chat workload of benchmarks/chat_sessions.py (pure data, no I/O).

`make_workload(seed)` returns the same sessions for the same seed: N users, each a multi-turn
chat under one shared system prompt (an application's), every user message about `user_words`
words, every reply `reply_tokens` tokens (EOS ignored), so the history grows by roughly
user + reply tokens per turn; some users think (idle) before some turns; one more user
regenerates every reply (a chat front end's swipe) `regenerations` extra times, keeping the last.
`messages_for()` builds the OpenAI `messages` of one turn from the replies a server gave so far,
exactly as a chat client resends its history.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_WORD_TEXT = (
    "the a an of to and in on for with about from that this it they we you our their some many "
    "every small large old new quiet bright dark warm cold river mountain city village garden "
    "forest ocean island station market library kitchen window bridge tower road field harbor "
    "engine lamp clock letter story map song recipe journey winter summer morning evening night "
    "friend teacher farmer sailor painter doctor child neighbour traveller builder baker writer "
    "walks builds finds remembers explains carries watches follows repairs paints describes "
    "writes opens closes asks answers learns teaches counts measures plants gathers because "
    "while after before when although slowly carefully quickly gently often rarely always "
    "never together alone again still already nearly simply mostly one two three four five "
    "seven ten hundred blue green red golden silver wooden stone paper glass iron"
)
WORDS = _WORD_TEXT.split()
TOPICS = (
    "planning a small vegetable garden",
    "learning to bake bread at home",
    "the history of lighthouses",
    "training for a first long run",
    "writing a short mystery story",
    "repairing an old bicycle",
    "choosing a telescope for a beginner",
    "organising a neighbourhood library",
    "cooking for a large family dinner",
    "a week-long hiking trip in the mountains",
    "keeping bees in a city",
    "teaching a child to play chess",
)
SYSTEM_PROMPT = (
    "You are Quill, the assistant of a community learning platform. Answer in plain, friendly "
    "English. Prefer short paragraphs and concrete steps. When the user asks for a plan, give a "
    "numbered list. When something is unsafe, say so clearly and suggest a safer way. Do not "
    "invent facts about people or places; when you are unsure, say what you would check and "
    "where. Keep answers focused on the user's question, refer back to earlier parts of the "
    "conversation when that helps, and end with one question that helps the user go on. The "
    "platform serves learners of every age, so avoid jargon unless the user uses it first, and "
    "explain any term you must use. Be encouraging, but honest about effort and cost."
)


@dataclass(frozen=True, slots=True)
class Turn:
    """One user message; the client waits `idle_before_s` (thinking) before sending it."""

    user_text: str
    idle_before_s: float
    regenerations: int  # extra sends of the same request (swipes); the last reply is kept


@dataclass(frozen=True, slots=True)
class Session:
    user_id: int
    topic: str
    turns: tuple[Turn, ...]

    @property
    def regenerates(self) -> bool:
        return any(t.regenerations for t in self.turns)

    @property
    def num_requests(self) -> int:
        return sum(1 + t.regenerations for t in self.turns)


@dataclass(frozen=True, slots=True)
class Workload:
    seed: int
    system_prompt: str
    reply_tokens: int
    sessions: tuple[Session, ...]

    @property
    def num_requests(self) -> int:
        return sum(s.num_requests for s in self.sessions)


def _user_text(rng: random.Random, topic: str, turn: int, num_words: int) -> str:
    opener = f"About {topic}:" if turn == 0 else f"Following up on {topic} (part {turn + 1}):"
    words: list[str] = []
    while len(words) < num_words:
        sentence = rng.choices(WORDS, k=rng.randint(7, 14))
        words.extend([sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."])
    return f"{opener} {' '.join(words[:num_words])} What do you suggest?"


def make_workload(
    seed: int = 0,
    *,
    num_users: int = 8,
    num_turns: int = 6,
    user_words: int = 80,
    reply_tokens: int = 128,
    num_idle_users: int = 3,
    idle_s: tuple[float, float] = (2.0, 8.0),
    regenerations: int = 2,
) -> Workload:
    """`num_users` chatting users plus one regenerating user (the last session)."""
    rng = random.Random(seed)
    idle_users = set(rng.sample(range(num_users), min(num_idle_users, num_users)))
    sessions = []
    for user in range(num_users + 1):
        topic = TOPICS[(seed + user) % len(TOPICS)] if user < len(TOPICS) else rng.choice(TOPICS)
        swipes = regenerations if user == num_users else 0
        turns = []
        for k in range(num_turns):
            # an idle user thinks before every other turn (never before the first)
            idle = round(rng.uniform(*idle_s), 2) if user in idle_users and k % 2 == 1 else 0.0
            turns.append(Turn(_user_text(rng, topic, k, user_words), idle, swipes))
        sessions.append(Session(user, topic, tuple(turns)))
    return Workload(seed, SYSTEM_PROMPT, reply_tokens, tuple(sessions))


def messages_for(workload: Workload, session: Session, turn: int, replies: list[str]) -> list[dict[str, str]]:
    """The chat history a client sends for `turn`: system, then each earlier exchange with the
    reply the server gave (`replies[k]` for turn k), then this turn's user message."""
    if len(replies) < turn:
        raise ValueError(f"turn {turn} needs {turn} earlier replies, got {len(replies)}")
    messages = [{"role": "system", "content": workload.system_prompt}]
    for k in range(turn):
        messages.append({"role": "user", "content": session.turns[k].user_text})
        messages.append({"role": "assistant", "content": replies[k]})
    messages.append({"role": "user", "content": session.turns[turn].user_text})
    return messages

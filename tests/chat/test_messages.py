"""Content parts the text-only prompt leaves out are counted, so they are never dropped silently."""

from __future__ import annotations

from kodkod.chat.messages import dropped_parts, flatten_content


def test_dropped_parts_counts_non_text_parts_by_type() -> None:
    messages = [
        {"role": "system", "content": "plain"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look "},
                {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                {"type": "image_url", "image_url": {"url": "http://x/b.png"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA"}},
                "bare string part",
            ],
        },
        {"role": "assistant", "content": None},
    ]
    assert dropped_parts(messages) == {"image_url": 2, "input_audio": 1}
    assert flatten_content(messages[1]["content"]) == "look bare string part"


def test_text_only_messages_drop_nothing() -> None:
    assert dropped_parts([{"content": "hi"}, {"content": [{"type": "text", "text": "x"}]}, {}]) == {}

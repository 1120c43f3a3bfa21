"""A follower's tally (gateway/streams/tally.py): repeats dropped, a gap filled from the result at
the end, and an end in error where what was sent is not the start of the result."""

from __future__ import annotations

from typing import Any

from gateway.streams.tally import DIVERGED, Tally


def text(seq: int, piece: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return "text", {"text": piece, "seq": seq, "tokens": [seq], **extra}


def finished(**result: Any) -> tuple[str, dict[str, Any]]:
    return "end", {"status": "finished", "result": {"text": "", "reasoning": None, "tool_calls": None, **result}}


def sent(tally: Tally, *entries: tuple[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [out for kind, data in entries for out in tally.take(kind, data)]


def test_entries_in_order_pass_without_their_bookkeeping() -> None:
    out = sent(Tally(), ("status", {"status": "started"}), text(1, "He"), text(2, "llo"), finished(text="Hello"))
    assert out[:3] == [("status", {"status": "started"}), ("text", {"text": "He"}), ("text", {"text": "llo"})]
    assert out[3][0] == "end" and out[3][1]["status"] == "finished"


def test_a_repeated_entry_is_dropped() -> None:
    out = sent(Tally(), text(1, "He"), text(2, "llo"), text(1, "He"), text(2, "llo"), text(3, "!"))
    assert "".join(data["text"] for _, data in out) == "Hello!"


def test_after_a_gap_the_rest_comes_from_the_result_before_the_end() -> None:
    out = sent(Tally(), text(1, "He"), text(3, "lo"), text(4, "!"), finished(text="Hello! Bye"))
    assert [kind for kind, _ in out] == ["text", "text", "end"]
    assert out[1][1] == {"text": "llo! Bye"}


def test_reasoning_calls_and_logprobs_are_filled_too() -> None:
    tally = Tally()
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    out = sent(
        tally,
        ("reasoning", {"text": "hm", "seq": 1, "tokens": [1], "logprobs": [{"t": 1}]}),
        ("call", {"index": 0, "id": "call_1", "name": "f", "seq": 3, "tokens": []}),
        finished(reasoning="hmm", text="", tool_calls=[call], logprobs=[{"t": 1}, {"t": 2}]),
    )
    assert out[1:] == [
        ("reasoning", {"text": "m"}),
        ("text", {"text": "", "logprobs": [{"t": 2}]}),
        ("call", {"index": 0, "id": "call_1", "name": "f"}),
        ("arguments", {"index": 0, "text": '{"a": 1}'}),
        out[-1],
    ]


def test_text_that_is_not_the_results_start_ends_in_an_error() -> None:
    out = sent(Tally(), text(1, "Hex"), finished(text="Help"))
    assert out == [("text", {"text": "Hex"}), ("end", {"status": "failed", "error": DIVERGED})]


def test_a_failed_end_passes_as_it_is() -> None:
    end = ("end", {"status": "failed", "error": {"message": "no"}})
    assert sent(Tally(), text(1, "a"), end)[1] == end

"""A row's output split as it grows (worker/output_split.py): plain strings, no model."""

from __future__ import annotations

import json
import random

import pytest

from worker import harmony
from worker.output_split import Markers, OutputSplit, Piece

MARKERS = Markers(think=("<think>", "</think>"), call=("<tool_call>", "</tool_call>"))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def feed_by_char(split: OutputSplit, text: str, cut: bool = False) -> list[Piece]:
    pieces = [piece for char in text for piece in split.feed(char)]
    return pieces + split.finish(cut)


def joined(pieces: list[Piece], kind: str) -> str:
    return "".join(p.text for p in pieces if p.kind == kind)


def test_text_streams_character_by_character_with_tools_offered() -> None:
    split = OutputSplit(MARKERS, tools=TOOLS)
    pieces = [split.feed(c) for c in "Hello <b>world</b>"]
    assert all(pieces[i] for i in range(len(pieces)) if "Hello <b>world</b>"[i] != "<")  # only "<" is held
    assert split.content == "Hello <b>world</b>" and not split.calls


def test_reasoning_is_apart_from_the_answer_and_no_marker_leaks() -> None:
    split = OutputSplit(MARKERS)
    pieces = feed_by_char(split, "<think>Let me see.</think>It is 4.")
    assert joined(pieces, "reasoning") == split.reasoning == "Let me see."
    assert joined(pieces, "text") == split.content == "It is 4."
    assert all("<" not in p.text for p in pieces)


def test_a_template_that_opens_the_reasoning_in_the_prompt_starts_thinking() -> None:
    split = OutputSplit(MARKERS, thinking=True)
    feed_by_char(split, "Hmm.</think>Yes.")
    assert (split.reasoning, split.content) == ("Hmm.", "Yes.")


def test_a_call_streams_its_name_then_its_arguments_and_nothing_reaches_content() -> None:
    split = OutputSplit(MARKERS, tools=TOOLS)
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    pieces = feed_by_char(split, text)
    kinds = [p.kind for p in pieces]
    assert kinds.index("call") < kinds.index("arguments")
    [call] = split.calls
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert joined(pieces, "arguments") == call["function"]["arguments"]
    assert len([p for p in pieces if p.kind == "arguments"]) > 3  # as it forms, not at the end
    assert split.content == "Sure. " and "tool_call" not in joined(pieces, "text")


def test_a_forced_call_cut_by_max_tokens_is_still_a_call() -> None:
    split = OutputSplit(MARKERS, forced=True, tools=TOOLS)
    pieces = feed_by_char(split, '{"name":"get_weather","arguments":{"city":"Par', cut=True)
    [call] = split.calls
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Par'}
    assert joined(pieces, "arguments") == '{"city":"Par' and not split.content


def test_a_forced_call_that_ends_keeps_the_models_own_argument_text() -> None:
    split = OutputSplit(MARKERS, forced=True, tools=TOOLS)
    pieces = feed_by_char(split, '{"name":"get_weather","arguments":{"city":"Paris"}}')
    assert split.calls[0]["function"]["arguments"] == '{"city":"Paris"}' == joined(pieces, "arguments")
    json.loads(split.calls[0]["function"]["arguments"])


TWO_TOOLS = [*TOOLS, {"type": "function", "function": {"name": "get_time", "parameters": {}}}]


@pytest.mark.parametrize(
    ("written", "tools", "name"),
    [
        ('{"name":"get_w', TWO_TOOLS, "get_weather"),  # one offered name begins so: that one
        ('{"name":"get_', TWO_TOOLS, None),  # either could follow: no call
        ('{"na', TOOLS, "get_weather"),  # nothing of the name yet, one tool: that one
    ],
)
def test_a_forced_call_cut_inside_its_name_is_named_only_where_the_tools_say_which(
    written: str, tools: list[dict[str, object]], name: str | None
) -> None:
    split = OutputSplit(MARKERS, forced=True, tools=tools)
    feed_by_char(split, written, cut=True)
    assert [c["function"]["name"] for c in split.calls] == ([name] if name else [])
    assert not split.content  # the forced JSON's start is not an answer either


@pytest.mark.parametrize("name", ["", "x" * 65])
def test_a_call_whose_name_no_call_can_carry_stays_text(name: str) -> None:
    split = OutputSplit(Markers(call=("<tool_call>", "</tool_call>")), tools=TOOLS)
    written = f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>'
    feed_by_char(split, written)
    assert not split.calls and split.content == written


def test_markup_that_is_not_a_call_stays_text() -> None:
    split = OutputSplit(MARKERS, tools=TOOLS)
    feed_by_char(split, "<tool_call>not json</tool_call> ok")
    assert not split.calls and split.content == "<tool_call>not json</tool_call> ok"


def test_call_markers_mean_nothing_without_tools() -> None:
    split = OutputSplit(MARKERS)
    feed_by_char(split, '<tool_call>{"name": "x", "arguments": {}}</tool_call>')
    assert not split.calls and split.content.startswith("<tool_call>")


def test_a_model_familys_own_parser_reports_each_call_whole() -> None:
    def parse(body: str, tools: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{"name": n, "arguments": {"n": i}} for i, n in enumerate(body.split(","))]

    split = OutputSplit(Markers(call=("[CALLS]", "[/CALLS]"), parser=parse), tools=TOOLS)
    pieces = feed_by_char(split, "[CALLS]a,b[/CALLS]")
    assert [c["function"]["name"] for c in split.calls] == ["a", "b"]
    assert [(p.kind, p.index) for p in pieces if p.kind == "call"] == [("call", 0), ("call", 1)]


class PromptTokenizer:
    """Decodes token ids as characters, for the prompt's tail."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_a_prompt_that_ends_in_the_start_marker_opens_the_reasoning() -> None:
    from worker.rows import opens_thinking

    def ids(text: str) -> list[int]:
        return [ord(c) for c in text]

    tokenizer = PromptTokenizer()
    assert opens_thinking(tokenizer, ids("<|im_start|>assistant\n<think>\n"), "<think>")
    assert not opens_thinking(tokenizer, ids("assistant\n<think>\n\n</think>\n\n"), "<think>")
    assert not opens_thinking(tokenizer, ids("<|im_start|>assistant\n"), "<think>")


TRICKY = [
    'Hi <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call> bye',
    '<tool_call>{"name":"f","arguments":{"a":1},"id":3}</tool_call>',
    "<tool_call>{'name': 'f'}</tool_call>",
    '<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"a": 1',
    '<think>a < b</think>x <tool_call>{"name": "g", "arguments": {}}</tool_call>'
    '<tool_call>{"name": "h", "arguments": {"z": [1, {"y": 2}]}}</tool_call>',
    "<thi",
    "plain </think> text <tool",
]


@pytest.mark.parametrize("text", TRICKY)
def test_what_is_streamed_always_adds_up_to_the_answer_in_any_chunking(text: str) -> None:
    rng = random.Random(text)
    for _ in range(300):
        split = OutputSplit(MARKERS, tools=TOOLS)
        pieces: list[Piece] = []
        at = 0
        while at < len(text):
            size = rng.randint(1, 6)
            pieces += split.feed(text[at : at + size])
            at += size
        pieces += split.finish()
        assert joined(pieces, "text") == split.content and joined(pieces, "reasoning") == split.reasoning
        announced = [p for p in pieces if p.kind == "call"]
        assert [p.index for p in announced] == list(range(len(split.calls)))  # every call shown is kept
        for index, call in enumerate(split.calls):
            streamed = "".join(p.text for p in pieces if p.kind == "arguments" and p.index == index)
            assert streamed == call["function"]["arguments"]
        assert "</tool_call>" not in split.content or "</tool_call>" in text


def test_with_parallel_tool_calls_off_only_the_first_call_is_streamed_or_kept() -> None:
    split = OutputSplit(MARKERS, tools=TOOLS, max_calls=1)
    pieces = feed_by_char(split, TRICKY[5])
    assert [c["function"]["name"] for c in split.calls] == ["g"]
    assert [p.name for p in pieces if p.kind == "call"] == ["g"]


HARMONY_ANSWER = (
    "<|channel|>analysis<|message|>Count them.<|end|>"
    "<|start|>assistant<|channel|>commentary<|message|>Counting now.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>It is <b>4</b>.<|return|>"
)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_gpt_oss_channels_split_into_reasoning_and_text_with_no_header_left(chunk: int) -> None:
    split = OutputSplit(harmony.MARKERS, tools=TOOLS)
    pieces = [p for i in range(0, len(HARMONY_ANSWER), chunk) for p in split.feed(HARMONY_ANSWER[i : i + chunk])]
    pieces += split.finish()
    assert joined(pieces, "reasoning") == split.reasoning == "Count them."
    assert joined(pieces, "text") == split.content == "Counting now.It is <b>4</b>."
    assert not split.calls


def test_a_gpt_oss_call_from_the_commentary_channel_is_a_call_ended_by_its_token_or_by_the_end() -> None:
    text = (
        "<|channel|>analysis<|message|>Needs a tool.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
    )
    for ending in ("<|call|>", ""):  # <|call|> is an end-of-text token of gpt-oss's: it may never show
        split = OutputSplit(harmony.MARKERS, tools=TOOLS)
        feed_by_char(split, text + ending)
        assert split.reasoning == "Needs a tool." and split.content == ""
        assert [c["function"] for c in split.calls] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]

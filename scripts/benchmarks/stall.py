"""The stall shape: streams running while a long prompt arrives.

A few streams decode; once each is under way, a long prompt is sent. A server
that prefills it in one go stops every stream for the whole prefill; one that cuts
it into pieces between decode steps pauses them a piece at a time. Reported per
server: the streams' median gap between two chunks before the long prompt came,
their longest pause while it was prefilled (up to its first token: the longest time
in which no stream got anything), that pause in median gaps, and the long prompt's
time to its first token.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

import httpx

WORDS = "the sea the sky a ship sails north under a grey moon while gulls call".split()


def _stream(base: str, body: dict[str, Any], arrivals: list[float], stop: threading.Event) -> None:
    """Note when each chunk with new output arrives, until the stream ends or `stop` is set."""
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=3600) as response:
            for line in response.iter_lines():
                if stop.is_set():
                    return  # hung up: each server stops the generation
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                deltas = [choice.get("delta", {}) for choice in chunk.get("choices", [])]
                if any(d.get("content") or d.get("reasoning_content") or d.get("tool_calls") for d in deltas):
                    arrivals.append(time.perf_counter())
    except httpx.HTTPError:
        pass


def run_stall(base: str, model: str, streams: int = 4, long_words: int = 480, tag: str = "") -> dict[str, float]:
    """The shape's measures on one server; `failed` 1 (and nothing else) when it could not be measured."""

    def body(content: str, max_tokens: int) -> dict[str, Any]:
        return {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
        }

    stop = threading.Event()
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    threads = [
        threading.Thread(target=_stream, args=(base, body(f"{tag} stream {i}: go on.", 4000), arrivals[i], stop))
        for i in range(streams)
    ]
    for thread in threads:
        thread.start()
    failed = {"failed": 1.0}
    deadline = time.perf_counter() + 600
    while min(len(a) for a in arrivals) < 12:  # every stream under way, its rhythm set
        if not all(thread.is_alive() for thread in threads) or time.perf_counter() > deadline:
            stop.set()
            return failed
        time.sleep(0.05)
    sent = time.perf_counter()
    first: list[float] = []
    long_text = f"{tag} " + " ".join(WORDS[i % len(WORDS)] for i in range(long_words))
    long = threading.Thread(target=_stream, args=(base, body(long_text, 4), first, threading.Event()))
    long.start()
    long.join()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    if not first or not all(times and times[-1] > first[0] for times in arrivals):
        return failed  # the long prompt got no answer, or a stream ended before it did
    answered = first[0]
    before = [b - a for times in arrivals for a, b in zip(times, times[1:], strict=False) if b <= sent]
    # A pause is a time when no stream gets anything: one stream alone can go quiet for a few tokens
    # while the others run. The window is from the long prompt's sending to the first chunk any
    # stream gets after its answer.
    merged = sorted(t for times in arrivals for t in times)
    end = next(t for t in merged if t > answered)
    window = [sent, *(t for t in merged if sent < t < end), end]
    pause = max(b - a for a, b in zip(window, window[1:], strict=False))
    gap = statistics.median(before) if before else float("nan")
    return {
        "failed": 0.0,
        "median_gap_s": gap,
        "longest_pause_s": pause,
        "pause_in_gaps": pause / gap if gap > 0 else float("nan"),
        "long_ttft_s": answered - sent,
    }

"""What a follower has been sent of a job's output, so that it is sent exactly the job's result.

Each output entry of a job stream carries its `seq` (shared/job_stream.py). An
entry seen before (a write retried after a broken connection, an attempt after
a crash making the same piece again) is dropped. A gap (entries Redis lost in a
restart) stops the output there: nothing after it can be shown in order. At the
end the result says what the whole output was; what the follower has not been
sent of it is sent then, before the end. Where what was sent is not the start of
the result (a Redis that lost entries an attempt then made differently), the
stream ends in an error, never in a normal finish over text that is not the
job's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.job_stream import OUTPUT

DIVERGED = {
    "message": "The stream lost part of the job's output in a Redis outage and cannot show it exactly; "
    "the job's result is whole: fetch it from /v1/jobs/{id}",
    "type": "server_error",
    "code": "stream_diverged",
}


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Tally:
    """One follower's account of the output sent to it."""

    seq: int = 0
    text: str = ""
    reasoning: str = ""
    calls: dict[int, _Call] = field(default_factory=dict)
    logprobs: int = 0
    gap: bool = False
    """An entry went missing: the output waits for the end, which brings the rest."""
    exact: bool = True
    """False for a follower that only waits for the end (its result is whole whatever the stream)."""

    def take(self, kind: str, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """What to send for this entry: nothing (seen, or after a gap), the entry itself, or at the
        end what was missing and then the end."""
        if not self.exact:
            return [(kind, data)]
        if kind == "end":
            return self._end(data)
        if kind not in OUTPUT or not isinstance(data.get("seq"), int):
            return [(kind, data)]
        seq = data["seq"]
        if seq <= self.seq:
            return []
        if seq != self.seq + 1 or self.gap:
            self.gap = True
            return []
        self.seq = seq
        shown = {k: v for k, v in data.items() if k not in ("seq", "tokens", "final")}
        self._count(kind, shown)
        return [(kind, shown)]

    def _count(self, kind: str, data: dict[str, Any]) -> None:
        self.logprobs += len(data.get("logprobs") or [])
        if kind == "text":
            self.text += data["text"]
        elif kind == "reasoning":
            self.reasoning += data["text"]
        elif kind == "call":
            self.calls[int(data["index"])] = _Call(str(data["id"]), str(data["name"]))
        elif int(data["index"]) in self.calls:
            self.calls[int(data["index"])].arguments += data["text"]

    def _end(self, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        result = data.get("result")
        if data.get("status") != "finished" or not isinstance(result, dict):
            return [("end", data)]
        missing = self._missing(result)
        if missing is None:
            return [("end", {"status": "failed", "error": DIVERGED})]
        return [*missing, ("end", data)]

    def _missing(self, result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
        """The entries that take what was sent to the whole result; None when what was sent is not
        its start."""
        out: list[tuple[str, dict[str, Any]]] = []
        reasoning, text = result.get("reasoning") or "", result.get("text") or ""
        if not reasoning.startswith(self.reasoning) or not text.startswith(self.text):
            return None
        if len(reasoning) > len(self.reasoning):
            out.append(("reasoning", {"text": reasoning[len(self.reasoning) :]}))
        logprobs = (result.get("logprobs") or [])[self.logprobs :]
        if len(text) > len(self.text) or logprobs:
            out.append(("text", {"text": text[len(self.text) :], **({"logprobs": logprobs} if logprobs else {})}))
        calls = result.get("tool_calls") or []
        if any(index >= len(calls) for index in self.calls):
            return None
        for index, call in enumerate(calls):
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            sent = self.calls.get(index)
            if sent is None:
                out.append(("call", {"index": index, "id": call["id"], "name": name}))
                sent = _Call(call["id"], name)
            if (sent.id, sent.name) != (call["id"], name) or not arguments.startswith(sent.arguments):
                return None
            if len(arguments) > len(sent.arguments):
                out.append(("arguments", {"index": index, "text": arguments[len(sent.arguments) :]}))
        for kind, data in out:
            self._count(kind, data)
        return out

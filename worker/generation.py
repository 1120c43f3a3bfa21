"""A generation asked of the engine (`Submission`) and the handle RQ's side holds on it (`Generation`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from shared.errors import InvalidRequest
from shared.job_stream import Resumed
from shared.models import ModelSpec
from shared.schemas import GenerateRequest
from worker.rows import Outcome, TextSink
from worker.tickets import StopReason

MISSING_MAX_TOKENS = "max_tokens: a job must carry it (the gateway sets it when it accepts the request)"


@dataclass
class Submission:
    """One generation asked of the engine. Its request carries `max_tokens`, resolved once at
    admission (gateway/admission/prompt_limits.py); the worker uses that value everywhere."""

    job_id: str
    request: GenerateRequest
    spec: ModelSpec
    deadline: float = field(default=float("inf"))
    """time.monotonic() after which the generation is stopped between tokens."""
    on_text: TextSink | None = None
    resume: Resumed | None = None
    """What earlier attempts at the job streamed (its worker died): this one carries on from there."""

    def __post_init__(self) -> None:
        if self.request.max_tokens is None:
            raise InvalidRequest(MISSING_MAX_TOKENS, param="max_tokens")

    @property
    def max_tokens(self) -> int:
        assert self.request.max_tokens is not None
        return self.request.max_tokens


class Generation:
    """Handle on a submitted generation: wait for it, or cancel it from any thread."""

    def __init__(self, submission: Submission) -> None:
        self.submission = submission
        self.load_s = 0.0
        self.generated = 0
        """Tokens generated so far by this attempt (an earlier attempt's are not counted)."""
        self._canceled = threading.Event()
        self._done = threading.Event()
        self._outcome: Outcome | None = None
        self._error: BaseException | None = None

    @property
    def job_id(self) -> str:
        return self.submission.job_id

    def cancel(self) -> None:
        self._canceled.set()

    def stop_reason(self) -> StopReason | None:
        if self._canceled.is_set():
            return "canceled"
        if time.monotonic() > self.submission.deadline:
            return "timeout"
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the generation ends or `timeout` passes; True when it has ended."""
        return self._done.wait(timeout)

    def result(self) -> Outcome:
        """The outcome of an ended generation; raises what the generation raised."""
        if not self._done.is_set():
            raise RuntimeError(f"generation {self.job_id} has not ended")
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome

    def end(self, outcome: Outcome | None, error: BaseException | None) -> None:
        """Called once, by the engine thread."""
        if error is not None:
            # The error crosses to another thread and may live on with the job; its traceback's
            # frames would keep the model (and its MLX memory) alive past any unload.
            error.__traceback__ = error.__context__ = error.__cause__ = None
        self._outcome, self._error = outcome, error
        self._done.set()

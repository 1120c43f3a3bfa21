"""One exception tree for every refusal and failure mlxq reports.

Each leaf carries its HTTP status, OpenAI-style `type` and `code`, and a
`retry_after_s` where waiting helps. The gateway turns any of them into
`{"error": {"message", "type", "code", "param"}}`; the worker stores the same
dict on a failed job so a poll shows the same error a direct call would.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple


class MlxqError(Exception):
    """Root of every error mlxq reports to a client."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"
    refusal: ClassVar[bool] = False
    """True for errors that turn work away before it is taken: these are counted by reason."""
    final: ClassVar[bool] = False
    """True when the answer is about a job that ran (or was refused) for good: a client that sent the
    same request again would only make more work, so the answer says `x-should-retry: false` (which
    the OpenAI SDKs obey; they retry 409 and every 5xx otherwise)."""

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.extra_headers: dict[str, str] = {}
        self.counted = False
        """True once this refusal is in the refusal counters (the admission script counts its own)."""

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.error_type, "code": self.code, "param": self.param}

    def to_body(self) -> dict[str, Any]:
        return {"error": self.to_dict()}

    def headers(self) -> dict[str, str]:
        retry = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        final = {"x-should-retry": "false"} if self.final else {}
        return {**self.extra_headers, **retry, **final}


class InvalidRequest(MlxqError):
    """The request is malformed or asks for something outside the limits."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "invalid_request"
    refusal = True


class ModelNotFound(MlxqError):
    """The model is not named in the models file."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    refusal = True


class JobNotFound(MlxqError):
    """No job with that id exists (or its result has expired)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "job_not_found"


class ResponseNotFound(MlxqError):
    """No stored response has this id (never stored, expired, deleted, or another key's)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "response_not_found"


class JobAlreadyEnded(MlxqError):
    """The job has already finished or failed, so there is nothing left to cancel."""

    final = True

    status_code = 409
    error_type = "invalid_request_error"
    code = "job_already_ended"


class Unauthorized(MlxqError):
    """No valid API key was given where one is required."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"
    refusal = True

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": "Bearer"}


class AdminKeyRequired(MlxqError):
    """An admin route called without an admin key (`MLXQ_ADMIN_KEYS`)."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "admin_key_required"


class RequestTooLarge(MlxqError):
    """The request body is larger than the gateway accepts."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"
    refusal = True


class BatchTooLarge(MlxqError):
    """The request has more generations than a configured limit allows at once; waiting never helps."""

    final = True

    status_code = 413
    error_type = "invalid_request_error"
    code = "batch_too_large"
    refusal = True


class ContextLengthExceeded(MlxqError):
    """A prompt (a batch's filled synthesis prompt) cannot fit the model's context.

    OpenAI's code, status and sentence ("This model's maximum context length is N tokens..."), which
    agent clients (opencode, Kilo) match to compact a long conversation by themselves; Anthropic's and
    Ollama's routes say it in their own words from the same numbers (`overflow`)."""

    final = True
    refusal = True

    status_code = 400
    error_type = "invalid_request_error"
    code = "context_length_exceeded"

    @classmethod
    def of_prompt(
        cls, prompt_tokens: int, context: int, *, param: str, tools_tokens: int | None = None, exact: bool = True
    ) -> ContextLengthExceeded:
        """A prompt of `prompt_tokens` (`tools_tokens` of them the tool definitions; at least that many
        unless `exact`) against a context of `context` tokens."""
        least = "" if exact else "at least "
        if tools_tokens:
            resulted = (
                f"{least}{prompt_tokens} tokens ({prompt_tokens - tools_tokens} in the messages, "
                f"{tools_tokens} in the functions). Please reduce the length of the messages or functions."
            )
        else:
            resulted = f"{least}{prompt_tokens} tokens. Please reduce the length of the messages."
        error = cls(
            f"This model's maximum context length is {context} tokens. However, your messages resulted in {resulted}",
            param=param,
        )
        error.overflow = Overflow(prompt_tokens, context)
        return error

    overflow: Overflow | None = None

    def to_dict(self) -> dict[str, Any]:
        numbers = {} if self.overflow is None else {"prompt_tokens": self.overflow[0], "context": self.overflow[1]}
        return {**super().to_dict(), **numbers}


class Overflow(NamedTuple):
    """How many tokens a prompt took, and how many the model's context holds."""

    prompt_tokens: int
    context: int


def overflow(error: MlxqError) -> Overflow | None:
    """The numbers of a context overflow, refused at once or recorded by the job that found it."""
    if isinstance(error, ContextLengthExceeded):
        return error.overflow
    recorded = getattr(error, "recorded", None)
    if isinstance(recorded, dict) and recorded.get("code") == ContextLengthExceeded.code:
        prompt_tokens, context = recorded.get("prompt_tokens"), recorded.get("context")
        if isinstance(prompt_tokens, int) and isinstance(context, int):
            return Overflow(prompt_tokens, context)
    return None


class CircuitOpen(MlxqError):
    """Workers keep failing to start; nothing is admitted until the next trial start."""

    status_code = 503
    code = "circuit_open"
    refusal = True


class InsufficientMemory(MlxqError):
    """Memory is too low to take more work (or to load the model asked for)."""

    status_code = 503
    code = "insufficient_memory"
    refusal = True


class ExceedsMemoryBudget(InsufficientMemory):
    """The work could not fit this worker's memory budget even alone: waiting will not help."""

    final = True


class RateLimited(MlxqError):
    """This client sent more submissions than its rate allows in the window."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limited"
    refusal = True


class TooManyInflight(MlxqError):
    """This client already has as many jobs queued or running as it may."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "too_many_inflight"
    refusal = True


class QueueFull(MlxqError):
    """The queues hold as many jobs as the service takes; come back when they have drained."""

    status_code = 503
    code = "queue_full"
    refusal = True


class GatewayBusy(MlxqError):
    """Every one of the gateway's Redis connections stayed in use for the pool's whole wait: the
    gateway is saturated, Redis is not down."""

    status_code = 503
    code = "gateway_busy"
    refusal = True


class IdempotencyConflict(MlxqError):
    """The Idempotency-Key was already used with a different request."""

    final = True

    status_code = 409
    error_type = "invalid_request_error"
    code = "idempotency_conflict"
    refusal = True


class JobWaitTimeout(MlxqError):
    """The call waited as long as it may; the job goes on and can be polled by its id."""

    final = True

    status_code = 504
    error_type = "server_error"
    code = "timeout"


class ModelUnavailable(MlxqError):
    """The model is configured but cannot be loaded (missing path, hub unreachable, bad files)."""

    final = True

    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"


class ModelFilesMissing(MlxqError):
    """The model is configured with a local path that has no model in it: refused before queuing."""

    final = True

    status_code = 422
    error_type = "invalid_request_error"
    code = "model_files_missing"
    refusal = True


class GenerationCanceled(MlxqError):
    """The job was canceled by a client before it finished."""

    final = True

    status_code = 409
    error_type = "invalid_request_error"
    code = "canceled"


class JobTimedOut(MlxqError):
    """The generation ran past the job's deadline and was stopped between tokens."""

    final = True

    status_code = 504
    error_type = "server_error"
    code = "job_timeout"


class GenerationFailed(MlxqError):
    """The worker failed while generating; the job is failed, the worker lives on."""

    final = True

    code = "generation_failed"


class WorkerCrashed(MlxqError):
    """The job was running each time its worker died, as often as allowed; it is not tried again."""

    final = True

    code = "worker_crashed"


class JobFailed(MlxqError):
    """A job a call was waiting for ended without a result; carries the error the job recorded."""

    final = True

    code = "job_failed"
    _STATUS_BY_CODE: ClassVar[dict[str, int]] = {
        "insufficient_memory": 503,
        "model_unavailable": 503,
        "worker_crashed": 500,
        "canceled": 409,
        "job_timeout": 504,
        "invalid_request": 422,
        "context_length_exceeded": 400,
    }

    def __init__(self, recorded: dict[str, Any]) -> None:
        super().__init__(str(recorded.get("message") or "the job failed"), param=recorded.get("param"))
        self.recorded = recorded

    @property
    def status_code(self) -> int:  # type: ignore[override]
        return self._STATUS_BY_CODE.get(str(self.recorded.get("code")), 500)

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "type": self.recorded.get("type") or self.error_type,
            "code": self.recorded.get("code") or self.code,
        }


class ServiceUnavailable(MlxqError):
    """A dependency (Redis, every worker) is down; retrying later may help."""

    status_code = 503
    code = "service_unavailable"


class ModelTooLarge(MlxqError):
    """A model to pull would not fit this machine (its weights over the model budget, or the disk):
    refused before any byte is fetched."""

    final = True

    status_code = 422
    error_type = "invalid_request_error"
    code = "model_too_large"


class ModelConflict(MlxqError):
    """The change asked for conflicts with the registry (a name taken, a model the models file defines)."""

    final = True

    status_code = 409
    error_type = "invalid_request_error"
    code = "model_conflict"


class HubUnavailable(MlxqError):
    """The model hub could not be reached or failed; nothing was changed."""

    status_code = 502
    code = "hub_unavailable"

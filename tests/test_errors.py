from __future__ import annotations

import traceback

from pydantic import BaseModel, Field

from gateway.jobs.records import _exception_line
from shared.errors import InvalidRequest, JobNotFound, MlxqError, ModelNotFound, ServiceUnavailable


def test_every_error_has_the_openai_body_shape() -> None:
    error = ModelNotFound("no such model", param="model")
    assert error.to_body() == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "code": "model_not_found",
            "param": "model",
        }
    }
    assert error.status_code == 404


def test_retry_after_becomes_a_header_only_when_set() -> None:
    assert ServiceUnavailable("down", retry_after_s=5).headers() == {"Retry-After": "5"}
    assert InvalidRequest("bad").headers() == {}


def test_leaves_are_all_mlxq_errors_with_distinct_codes() -> None:
    leaves = MlxqError.__subclasses__()
    assert JobNotFound in leaves
    codes = [leaf.code for leaf in leaves]
    assert len(codes) == len(set(codes))
    assert all(leaf.__doc__ for leaf in leaves)


def test_a_crash_the_task_did_not_describe_is_named_by_its_exception_not_its_notes() -> None:
    class Result(BaseModel):
        name: str = Field(min_length=1)

    try:
        Result(name="")
    except ValueError:
        text = traceback.format_exc()
    assert text.strip().splitlines()[-1].startswith("    For further information")  # what was shown
    assert _exception_line(text).startswith("pydantic_core._pydantic_core.ValidationError: 1 validation error")
    assert _exception_line("") == "the job failed without an error message"

"""JSON the gateway writes with orjson (gateway/http/json_answer.py): what the standard library's encoder
accepted is still written, and reads back the same."""

from __future__ import annotations

import json

from gateway.http.json_answer import json_answer, json_text
from shared import job_stream


def test_stream_events_read_back_as_what_was_written() -> None:
    document = {"delta": {"content": "naïve 日本 \u2028"}, "n": 3, "x": 0.1, "none": None, 7: "int key"}
    written = json_text(document)
    assert json.loads(written) == {**{k: v for k, v in document.items() if k != 7}, "7": "int key"}
    assert "日本" in written  # UTF-8, not escapes


def test_an_integer_past_64_bits_is_written_as_the_standard_library_writes_it() -> None:
    assert json.loads(json_text({"seed": 2**70})) == {"seed": 2**70}


def test_an_answer_is_json_with_its_headers() -> None:
    response = json_answer({"data": [[0.5, -1.25]]}, {"x-mlxq-job-id": "j1"})
    assert response.media_type == "application/json" and response.headers["x-mlxq-job-id"] == "j1"
    assert json.loads(response.body) == {"data": [[0.5, -1.25]]}


def test_a_job_streams_entry_reads_back_as_written_an_integer_past_64_bits_too() -> None:
    for data in ({"text": "日本", "tokens": [1, 2]}, {"seed": 2**70}):
        assert job_stream.decode(job_stream.entry("end", **data)) == ("end", data)

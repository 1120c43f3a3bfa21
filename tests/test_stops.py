from __future__ import annotations

from worker.stops import StopMatcher


def test_finds_the_earliest_stop_string() -> None:
    matcher = StopMatcher(["END", "\n\n"])
    assert matcher.find("abc\n\nxyz END") == 3
    assert matcher.find("nothing here") is None


def test_finds_a_stop_string_that_began_before_the_new_text() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.find("abcSTOP", start=5) == 3


def test_holds_back_text_that_may_become_a_stop_string() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.safe_length("the answer is 4 </ans") == len("the answer is 4 ")
    assert matcher.safe_length("plain text") == len("plain text")


def test_no_stops_means_everything_is_safe() -> None:
    assert StopMatcher([]).safe_length("abc") == 3
    assert StopMatcher([]).find("abc") is None

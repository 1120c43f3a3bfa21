"""The engine thread with the real demo model, in-process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.utils import load_tokenizer

from shared.embeddings import EmbedRequest
from shared.errors import GenerationCanceled, InvalidRequest, JobTimedOut, ModelUnavailable
from shared.job_stream import Resumed
from shared.models import ModelSpec
from shared.schemas import GenerateRequest
from shared.settings import Settings
from worker import embedding
from worker.assembly import build_engine
from worker.demo_model import build_embedding_model
from worker.embedding import EmbedWork
from worker.engine import Engine
from worker.generation import Generation, Submission
from worker.output_split import Piece
from worker.rows import Outcome, Sent


@pytest.fixture
def engine() -> Iterator[Engine]:
    running = build_engine(Settings(), 10**10, prefix_cache_bytes=0)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def demo(tmp_path: Path) -> ModelSpec:
    return ModelSpec("tiny", path=tmp_path / "tiny", builtin=True)


def submit(engine: Engine, spec: ModelSpec, job_id: str, **request: object) -> Submission:
    req = GenerateRequest.model_validate({"model": spec.name, "prompt": "Hello", "max_tokens": 16, **request})
    return Submission(job_id=job_id, request=req, spec=spec)


def test_streamed_pieces_add_up_to_the_final_text(engine: Engine, demo: ModelSpec) -> None:
    pieces: list[Piece] = []
    sub = submit(engine, demo, "a", max_tokens=30, ignore_eos=True)
    sub.on_text = lambda sent: pieces.append(sent.piece)
    handle = engine.submit(sub)
    assert handle.wait(30)
    outcome = handle.result()
    assert outcome.completion_tokens == 30
    assert "".join(piece.text for piece in pieces if piece.kind == "text") == outcome.text
    assert engine.active_job_ids() == []


LONG_STRING = {"type": "object", "properties": {"a": {"type": "string", "minLength": 60}}, "required": ["a"]}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def resumed_from(sents: list[Sent]) -> Resumed:
    """What shared/job_stream.py's `resumed` reads from a stream holding these pieces."""
    ids = {sent.piece.index: sent.piece.id for sent in sents if sent.piece.kind == "call"}
    tokens = [token for sent in sents for token in sent.tokens]
    return Resumed(sents[-1].seq, tokens, [], ids, sents[-1].final)


def generate(
    engine: Engine, spec: ModelSpec, job_id: str, asked: dict[str, object], resume: Resumed | None = None
) -> tuple[Outcome, list[Sent]]:
    sents: list[Sent] = []
    sub = submit(engine, spec, job_id, **asked)
    sub.on_text, sub.resume = sents.append, resume
    handle = engine.submit(sub)
    assert handle.wait(30)
    return handle.result(), sents


@pytest.mark.parametrize(
    "asked",
    [
        {"max_tokens": 40, "ignore_eos": True, "temperature": 0},
        {"max_tokens": 40, "ignore_eos": True, "temperature": 1.0, "seed": 7},
        {"max_tokens": 40, "temperature": 0, "json_schema": LONG_STRING},
        {
            "prompt": None,
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 40,
            "temperature": 0,
        },
    ],
    ids=["text", "seeded", "json-schema", "tool-call"],
)
def test_a_resumed_generation_carries_on_where_its_stream_was(
    engine: Engine, demo: ModelSpec, asked: dict[str, object]
) -> None:
    """What a job run again after its worker died does (worker/tasks.py): from the tokens of the
    first pieces, it makes the same output (greedy, or with the same seed), its calls keep their
    ids, and it sends only the pieces after those."""
    expected, whole = generate(engine, demo, "whole", asked)
    assert len(whole) > 6
    kept = whole[:5]
    outcome, again = generate(engine, demo, "again", asked, resumed_from(kept))
    assert (outcome.text, outcome.completion_tokens) == (expected.text, expected.completion_tokens)
    assert outcome.tool_calls == expected.tool_calls
    assert [sent.seq for sent in again] == list(range(6, 6 + len(again)))
    assert [sent.piece for sent in kept + again] == [sent.piece for sent in whole]


def test_a_generation_that_had_ended_ends_again_without_generating(engine: Engine, demo: ModelSpec) -> None:
    """Its worker died after its last pieces went out, before the job's end was recorded."""
    plain = {"max_tokens": 40, "ignore_eos": True, "temperature": 0}
    text = generate(engine, demo, "plain", plain)[0].text
    stopped = {**plain, "stop": [text[20:24]]}
    expected, whole = generate(engine, demo, "stopped", stopped)
    assert expected.finish_reason == "stop" and whole[-1].final == "stop"
    outcome, again = generate(engine, demo, "again", stopped, resumed_from(whole))
    assert (outcome.text, outcome.finish_reason, outcome.stop_sequence) == (
        expected.text,
        "stop",
        expected.stop_sequence,
    )
    assert again == []


def test_cancel_stops_between_tokens(engine: Engine, demo: ModelSpec) -> None:
    handle = engine.submit(submit(engine, demo, "long", max_tokens=30_000, ignore_eos=True))
    time.sleep(0.5)
    assert engine.cancel("long")
    assert handle.wait(2)
    with pytest.raises(GenerationCanceled):
        handle.result()


def test_a_deadline_stops_the_generation(engine: Engine, demo: ModelSpec) -> None:
    sub = submit(engine, demo, "slow", max_tokens=30_000, ignore_eos=True)
    sub.deadline = time.monotonic() + 0.5
    handle = engine.submit(sub)
    assert handle.wait(5)
    with pytest.raises(JobTimedOut):
        handle.result()


def test_a_failing_load_fails_that_generation_only(engine: Engine, demo: ModelSpec, tmp_path: Path) -> None:
    broken = ModelSpec("broken", path=tmp_path / "nothing")
    bad = engine.submit(submit(engine, broken, "bad"))
    good = engine.submit(submit(engine, demo, "good", max_tokens=3))
    assert bad.wait(30) and good.wait(30)
    with pytest.raises(ModelUnavailable, match="does not exist"):
        bad.result()
    assert good.result().completion_tokens <= 3


def run_all(engine: Engine, subs: list[Submission]) -> list[Outcome]:
    handles = [engine.submit(sub) for sub in subs]
    for handle in handles:
        assert handle.wait(120)
    return [handle.result() for handle in handles]


CONTEXT = " ".join(f"fact {i} is that the sky was clear on day {i}." for i in range(40))


def test_children_sharing_a_prefix_compute_it_once_and_match_their_text_without_reuse(demo: ModelSpec) -> None:
    def children(prefix: str) -> list[Submission]:
        return [
            submit(engine, demo, f"{prefix}{i}", prompt=f"{CONTEXT} Question {i}:", max_tokens=12, temperature=0)
            for i in range(8)
        ]

    engine = build_engine(Settings(max_batch=16), 10**10, prefix_cache_bytes=0)
    engine.start()
    try:
        plain = run_all(engine, children("plain"))
    finally:
        engine.stop()
    assert all(o.cached_tokens == 0 for o in plain)

    engine = build_engine(Settings(max_batch=16), 10**10, prefix_cache_bytes=10**8)
    engine.start()
    try:
        shared = run_all(engine, children("shared"))
        again = run_all(
            engine, [submit(engine, demo, "again", prompt=f"{CONTEXT} Question 3:", max_tokens=12, temperature=0)]
        )[0]
    finally:
        engine.stop()
    prompt_tokens = plain[0].prompt_tokens
    assert prompt_tokens > 200
    # The first computes the prefix, the other seven start from it (all but their own question).
    assert shared[0].cached_tokens == 0
    assert all(prompt_tokens - 8 <= o.cached_tokens < prompt_tokens for o in shared[1:])
    assert [o.text for o in shared] == [o.text for o in plain]
    # A later request with the same prompt starts from the cache a finished one left.
    assert again.cached_tokens == prompt_tokens - 1
    assert again.text == plain[3].text


def test_sampling_controls_are_per_row_in_one_batch(demo: ModelSpec) -> None:
    engine = build_engine(Settings(max_batch=16), 10**10, prefix_cache_bytes=0)
    engine.start()
    try:
        base = {"prompt": "The sea", "max_tokens": 12, "ignore_eos": True}
        [greedy] = run_all(engine, [submit(engine, demo, "greedy", temperature=0, **base)])
        forced = 77
        rows = run_all(
            engine,
            [
                submit(engine, demo, "top_k", temperature=1.0, top_k=1, seed=5, **base),
                submit(engine, demo, "top_k_unseeded", temperature=1.0, top_k=1, **base),
                submit(engine, demo, "bias", temperature=0, logit_bias={str(forced): 100.0}, **base),
                submit(engine, demo, "presence", temperature=0, presence_penalty=2.0, **base),
                submit(engine, demo, "plain", temperature=0, **base),
                submit(engine, demo, "top_k_beyond_vocab", temperature=0, top_k=1_000_000, **base),
            ],
        )
    finally:
        engine.stop()
    top_k, top_k_unseeded, bias, presence, plain, beyond = rows
    assert beyond.text == greedy.text  # a k past the vocabulary cuts nothing
    assert top_k.text == greedy.text and top_k_unseeded.text == greedy.text  # top_k=1 is greedy
    assert plain.text == greedy.text
    assert bias.text != greedy.text and bias.completion_tokens == 12
    assert presence.text != greedy.text  # greedy text of a random model repeats; the penalty breaks it


def test_logit_bias_forces_its_token_and_an_unknown_token_is_refused(demo: ModelSpec) -> None:
    engine = build_engine(Settings(max_batch=16), 10**10, prefix_cache_bytes=0)
    engine.start()
    try:
        sub = submit(engine, demo, "forced", prompt="x", max_tokens=6, temperature=0, logit_bias={"77": 100.0})
        [forced] = run_all(engine, [sub])
        beyond = engine.submit(submit(engine, demo, "beyond", max_tokens=2, logit_bias={"999999": 5.0}))
        assert beyond.wait(30)
        with pytest.raises(InvalidRequest) as refused:
            beyond.result()
    finally:
        engine.stop()
    assert refused.value.param == "logit_bias"
    assert forced.completion_tokens == 6
    piece = forced.text[: len(forced.text) // 6]
    assert piece and forced.text == piece * 6  # the same token six times


def steps_beside_a_long_prompt(demo: ModelSpec, pause_steps: float) -> tuple[int, int]:
    """(decode steps a running row took while a long prompt was prefilled beside it, that prompt's
    tokens), on an engine whose turns with a piece of prefill take at most `pause_steps` normal turns."""
    running = build_engine(Settings(prefill_pause_steps=pause_steps), 10**10, prefix_cache_bytes=0)
    running.start()
    try:
        tokens: list[int] = []
        beside = submit(running, demo, "beside", max_tokens=30_000, ignore_eos=True)
        beside.on_text = lambda sent: tokens.extend(sent.tokens)
        handle = running.submit(beside)
        while len(tokens) < 20:  # decoding, its step measured
            time.sleep(0.01)
        first: list[int] = []
        long = submit(running, demo, "long", prompt="the sea " * 1500, max_tokens=2, ignore_eos=True)
        long.on_text = lambda sent: first.append(len(tokens)) if not first else None
        at = len(tokens)
        done = running.submit(long)
        assert done.wait(120)
        running.cancel("beside")
        assert handle.wait(10)
        return first[0] - at, done.result().prompt_tokens
    finally:
        running.stop()


def test_a_long_prompt_is_prefilled_in_pieces_sized_by_the_decode_steps_beside_it(demo: ModelSpec) -> None:
    """A turn carrying a piece of a prompt's prefill takes at most MLXQ_PREFILL_PAUSE_STEPS normal turns
    (worker/prefill_pace.py): a running row decodes between pieces, and a shorter pause means more,
    smaller pieces. A fixed size in tokens would give the same count of pieces for both."""
    fine, prompt_tokens = steps_beside_a_long_prompt(demo, pause_steps=1.5)
    coarse, _ = steps_beside_a_long_prompt(demo, pause_steps=16)
    assert prompt_tokens > 3000
    assert coarse >= 2  # even coarse pieces leave the running row decoding between them
    assert fine >= 3 * coarse, (fine, coarse)


def test_the_engine_shows_progress_after_every_piece_of_a_long_prefill(engine: Engine, demo: ModelSpec) -> None:
    """The watchdog's hang check reads the engine's last sign of life (the heartbeat's progress_age_s):
    a prompt prefilled alone marks progress after each piece, so a prefill longer than the hang
    timeout is no hang. One prefill in a single call would leave one gap as long as all of it."""
    warm = engine.submit(submit(engine, demo, "warm", max_tokens=2))
    assert warm.wait(120)
    # Pieces of a tenth of a second where no row decodes beside them, and many even on a fast machine.
    engine.runner.pace.alone_s, engine.runner.pace.max_tokens = 0.1, 512
    marks: list[float] = []
    watching = True

    def watch() -> None:
        while watching:
            if not marks or engine.progress_at != marks[-1]:
                marks.append(engine.progress_at)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    first: list[float] = []
    long = submit(engine, demo, "long", prompt="the sea " * 4500, max_tokens=2, ignore_eos=True)
    long.on_text = lambda sent: first.append(time.monotonic()) if not first else None
    started = time.monotonic()
    done = engine.submit(long)
    assert done.wait(120)
    watching = False
    watcher.join()
    assert done.result().prompt_tokens > 8000
    prefill_s = first[0] - started
    during = [m for m in marks if started <= m <= first[0]]
    gaps = [b - a for a, b in zip([started, *during], [*during, first[0]], strict=True)]
    assert len(during) >= 8, (prefill_s, gaps)
    assert max(gaps) <= prefill_s / 2, (prefill_s, gaps)


SHORT_PROMPTS = [
    f"{word} is the word for today, number {i}." for i, word in enumerate("sun moon rain snow wind fog hail".split())
]


def test_short_prompts_beside_a_long_one_are_not_padded_to_its_pieces(
    demo: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlx-lm pads every row of a piece of prefill to the longest: seven chats arriving with a long
    document would be computed as seven more documents' worth of pieces. Pieces are cut so that at
    most a third of what they compute is padding (worker/prefill_pace.py `unpadded`), and the texts
    are those of each prompt alone."""
    computed: list[tuple[int, int, int]] = []
    prompt = PromptProcessingBatch.prompt

    def counted(self: PromptProcessingBatch, tokens: list[list[int]]) -> None:
        if tokens:
            computed.append((len(tokens), len(tokens) * max(len(t) for t in tokens), sum(len(t) for t in tokens)))
        prompt(self, tokens)

    def subs(tag: str) -> list[Submission]:
        long = submit(engine, demo, f"{tag}-long", prompt="the sea " * 2000, max_tokens=4, temperature=0)
        return [long] + [
            submit(engine, demo, f"{tag}-{i}", prompt=text, max_tokens=8, temperature=0)
            for i, text in enumerate(SHORT_PROMPTS)
        ]

    engine = build_engine(Settings(), 10**10, prefix_cache_bytes=0)
    engine.start()
    try:
        alone = [run_all(engine, [sub])[0] for sub in subs("alone")]
        monkeypatch.setattr(PromptProcessingBatch, "prompt", counted)
        together = run_all(engine, subs("together"))
    finally:
        engine.stop()
    assert together[0].prompt_tokens > 4000
    assert [o.text for o in together] == [o.text for o in alone]
    assert any(rows > 1 for rows, _, _ in computed), computed  # prefilled together
    assert all(positions - tokens <= positions / 3 for _, positions, tokens in computed), computed


OPENING = "You are a careful assistant."
"""Short (under MIN_SHARED_TOKENS of the demo's tokens, under half the question): not worth waiting for."""


def test_a_request_beginning_like_one_still_prefilling_copies_the_part_already_computed(demo: ModelSpec) -> None:
    """Requests that arrive together and begin alike (a template's opening, a system prompt) compute
    that beginning once, however short: the later one copies it out of the member still prefilling
    (its cache is left-padded between pieces), and its text is what it is alone."""
    asked = f"{OPENING} Question: what colour is the sky on a clear day at noon?"
    question = dict(prompt=asked, max_tokens=12, temperature=0)
    alone_engine = build_engine(Settings(), 10**10, prefix_cache_bytes=0)
    alone_engine.start()
    try:
        [alone] = run_all(alone_engine, [submit(alone_engine, demo, "alone", **question)])
    finally:
        alone_engine.stop()

    running = build_engine(Settings(prefill_pause_steps=1.5), 10**10, prefix_cache_bytes=10**8)
    running.start()
    try:
        tokens: list[int] = []
        beside = submit(running, demo, "beside", max_tokens=30_000, ignore_eos=True)
        beside.on_text = lambda sent: tokens.extend(sent.tokens)
        running.submit(beside)
        while len(tokens) < 5:
            time.sleep(0.01)
        long = running.submit(submit(running, demo, "long", prompt=f"{OPENING} {'the sea ' * 1500}", max_tokens=2))
        at = len(tokens)
        while len(tokens) < at + 10:  # ten pieces of the long prompt's prefill at least 8 tokens each
            time.sleep(0.01)
        assert not long.wait(0)  # still prefilling: 3,000 tokens in pieces of a decode step's time
        [copied] = run_all(running, [submit(running, demo, "copied", **question)])
        running.cancel("beside")
        assert long.wait(120)
    finally:
        running.stop()
    assert demo.path is not None
    tokenizer = load_tokenizer(demo.path)
    opening, whole = tokenizer.encode(OPENING), tokenizer.encode(question["prompt"])
    begins_alike = next(n for n, (a, b) in enumerate(zip(opening + [-1], whole, strict=False)) if a != b)
    assert copied.cached_tokens == begins_alike >= 8, (begins_alike, copied.cached_tokens)
    assert copied.text == alone.text


def test_vectors_beside_a_decoding_stream_come_in_batches_cut_to_its_pause(
    engine: Engine, demo: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone, an embedding job's 32 inputs are one batch; beside a stream they are cut to the time a piece of
    prefill may take, at the embedding model's own speed, so the stream pauses no longer than for a piece."""
    sizes: list[int] = []
    forward = embedding.forward

    def counted(model: object, rows: list[list[int]], pad_id: int) -> list[list[float]]:
        sizes.append(len(rows))
        return forward(model, rows, pad_id)

    monkeypatch.setattr(embedding, "forward", counted)
    spec = ModelSpec("embed", path=build_embedding_model(tmp_path / "embed"))
    inputs: list[str | list[int]] = [f"sentence number {i} about the weather and the sea" for i in range(32)]

    def embed(job_id: str) -> EmbedWork:
        work = EmbedWork(job_id, EmbedRequest(model="embed", inputs=inputs), spec)
        engine.embed(work)
        assert work.wait(60) and work.error is None
        return work

    alone = embed("alone")
    assert sizes == [32]
    sizes.clear()
    made = threading.Event()
    sub = submit(engine, demo, "stream", max_tokens=100_000, ignore_eos=True)
    sub.on_text = lambda sent: made.set() if sent.seq >= 30 else None
    stream = engine.submit(sub)
    assert made.wait(60)
    beside = embed("beside")
    assert stream.generated > 0 and engine.cancel("stream")
    assert len(sizes) > 2 and sum(sizes) == 32
    for mine, theirs in zip(beside.vectors, alone.vectors, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-4)


def test_dimensions_past_the_models_vectors_are_refused_on_the_first_batch(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI's rule (Ollama's gives whole vectors): known once a batch has run, not after all of them."""
    batches: list[int] = []
    forward = embedding.forward
    monkeypatch.setattr(embedding, "forward", lambda *args: batches.append(1) or forward(*args))
    spec = ModelSpec("embed", path=build_embedding_model(tmp_path / "embed"))
    inputs: list[str | list[int]] = [f"sentence {i}" for i in range(64)]
    for strict, ends in ((True, "refused"), (False, "whole")):
        batches.clear()
        asked = EmbedRequest(model="embed", inputs=inputs, dimensions=100_000, strict_dimensions=strict)
        work = EmbedWork(f"wide-{strict}", asked, spec)
        engine.embed(work)
        assert work.wait(60)
        if ends == "refused":
            assert isinstance(work.error, InvalidRequest) and work.error.param == "dimensions"
            assert len(batches) == 1
        else:
            assert work.error is None and len(batches) > 1 and all(v is not None for v in work.vectors)


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def waiting_with(engine: Engine, demo: ModelSpec, first: str, *claimed: str) -> Generation:
    """`first` submitted to the idle engine, which holds it, with `claimed` claimed beside it and not submitted;
    the wait's bound set so far off that only an event can end it."""
    engine.gather_s = 60.0
    for job_id in (first, *claimed):
        engine.expect(job_id)
    handle = engine.submit(submit(engine, demo, first, max_tokens=4, ignore_eos=True))
    wait_until(lambda: engine._inbox.empty())
    return handle


def test_jobs_claimed_together_are_prefilled_together(engine: Engine, demo: ModelSpec) -> None:
    """A job reaching an idle engine waits for the jobs claimed with it (worker/rq_worker.py tells the engine
    of each claim): a prefill begun on it alone would hold the others back by its whole length."""
    first = waiting_with(engine, demo, "first", "second")
    time.sleep(0.3)  # long enough for the first job's tokens, were it prefilled alone
    assert first.generated == 0
    second_at = time.time()
    second = engine.submit(submit(engine, demo, "second", max_tokens=4, ignore_eos=True))
    assert first.wait(30) and second.wait(30)
    made = [handle.result().first_token_at for handle in (first, second)]
    assert all(at is not None and at >= second_at for at in made)


def test_a_claimed_job_that_ends_before_the_engine_lets_the_others_start(engine: Engine, demo: ModelSpec) -> None:
    handle = waiting_with(engine, demo, "runs", "fails before submitting")
    engine.unexpect("fails before submitting")
    assert handle.wait(30)  # well before the wait's bound
    assert handle.result().completion_tokens == 4


def test_a_job_claimed_after_the_wait_began_does_not_lengthen_it(engine: Engine, demo: ModelSpec) -> None:
    """Under a steady flow of claims one more job is always on its way: the wait is for those claimed by then."""
    first = waiting_with(engine, demo, "first", "second")
    time.sleep(0.5)  # the engine is waiting for the second
    engine.expect("claimed later")
    second = engine.submit(submit(engine, demo, "second", max_tokens=4, ignore_eos=True))
    assert first.wait(30) and second.wait(30)  # well before the bound, without the one claimed later
    engine.unexpect("claimed later")

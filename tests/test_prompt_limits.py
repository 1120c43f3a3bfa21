"""Size and shape limits, with the demo model's real tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.admission.prompt_limits import QUICK_CHARS, PromptLimits
from shared.embeddings import EmbedRequest
from shared.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from shared.models import ModelRegistry
from shared.schemas import GenerateRequest
from shared.settings import Settings
from worker.demo_model import build_tiny_model


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    build_tiny_model(Settings(data_dir=data).builtin_model_dir("tiny"))
    return data


def limits(data_dir: Path, tmp_path: Path, models: str = "", **settings: object) -> PromptLimits:
    models_file = tmp_path / "models.toml"
    models_file.write_text(models)
    config = Settings(data_dir=data_dir, models_file=models_file, **settings)
    return PromptLimits(ModelRegistry.from_settings(config), config)


def ask(**body: object) -> GenerateRequest:
    return GenerateRequest.model_validate({"model": "tiny", "prompt": "hello", **body})


def test_an_unknown_model_is_refused_first(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        limits(demo_dir, tmp_path).check(ask(model="nope", max_tokens=10**9))


def test_max_tokens_over_the_cap_is_a_ceiling(demo_dir: Path, tmp_path: Path) -> None:
    checker = limits(demo_dir, tmp_path, max_tokens_cap=100)
    assert checker.check(ask(max_tokens=32000)).max_tokens == 100
    assert checker.check(ask(max_tokens=7)).max_tokens == 7
    assert checker.check(ask()).max_tokens == 100  # none asked: up to the limit
    assert limits(demo_dir, tmp_path, max_tokens_cap=100, default_max_tokens=20).check(ask()).max_tokens == 20


def test_a_prompt_over_the_character_limit_is_refused(demo_dir: Path, tmp_path: Path) -> None:
    checker = limits(demo_dir, tmp_path, max_prompt_chars=100)
    with pytest.raises(InvalidRequest, match="101 characters; the limit is 100") as caught:
        checker.check(ask(prompt="x" * 101))
    assert caught.value.param == "prompt"
    messages = [{"role": "user", "content": "y" * 60}, {"role": "user", "content": "z" * 60}]
    with pytest.raises(InvalidRequest) as caught:
        checker.check(GenerateRequest.model_validate({"model": "tiny", "messages": messages}))
    assert caught.value.param == "messages"


def test_a_per_model_character_limit_overrides_the_service_one(demo_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "m"
    local.mkdir()
    (local / "config.json").write_text("{}")
    checker = limits(demo_dir, tmp_path, f'[models.small]\npath = "{local}"\nmax_prompt_chars = 10\n')
    checker.check(ask(prompt="x" * 50))
    with pytest.raises(InvalidRequest, match="limit is 10"):
        checker.check(ask(model="small", prompt="x" * 11))


def test_tokens_are_counted_with_the_models_tokenizer_against_its_context(demo_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "ctx"
    local.mkdir()
    demo = Settings(data_dir=demo_dir).builtin_model_dir("tiny")
    (local / "config.json").write_text('{"max_position_embeddings": 64}')
    (local / "tokenizer.json").write_bytes((demo / "tokenizer.json").read_bytes())
    checker = limits(demo_dir, tmp_path, f'[models.ctx64]\npath = "{local}"\n', max_prompt_chars=10_000)
    checker.check(ask(model="ctx64", prompt="hi", max_tokens=32))
    words = "the quick brown fox " * 40  # a few hundred characters, well over 64 tokens
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 64 tokens") as caught:
        checker.check(ask(model="ctx64", prompt=words, max_tokens=1))
    assert caught.value.param == "prompt" and caught.value.status_code == 400
    assert caught.value.to_dict()["code"] == "context_length_exceeded"
    # A prompt that fits, with max_tokens that does not: it runs to the context's end.
    medium = "the quick brown fox " * 5
    fitted = checker.check(ask(model="ctx64", prompt=medium, max_tokens=60))
    assert fitted.exact and fitted.max_tokens == 64 - fitted.prompt_tokens < 60


def chat_copy(demo_dir: Path, tmp_path: Path, context: int) -> Path:
    """The demo model's tokenizer and chat template with a context of `context` tokens."""
    local = tmp_path / "chat"
    local.mkdir()
    demo = Settings(data_dir=demo_dir).builtin_model_dir("tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (local / name).write_bytes((demo / name).read_bytes())
    (local / "config.json").write_text(f'{{"max_position_embeddings": {context}}}')
    return local


def small_chat_model(demo_dir: Path, tmp_path: Path, context: int) -> PromptLimits:
    local = chat_copy(demo_dir, tmp_path, context)
    return limits(demo_dir, tmp_path, f'[models.chat]\npath = "{local}"\n', max_prompt_chars=100_000)


TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Looks a word up. " * 30,
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}


def chat(**body: object) -> GenerateRequest:
    return GenerateRequest.model_validate({"model": "chat", "messages": [{"role": "user", "content": "Hi"}], **body})


def test_the_prompt_is_counted_as_the_model_sees_it_tools_and_template_included(demo_dir: Path, tmp_path: Path) -> None:
    checker = small_chat_model(demo_dir, tmp_path, context=4096)
    bare, with_tools = checker.check(chat()), checker.check(chat(tools=[TOOL]))
    assert bare.exact and with_tools.exact
    assert bare.prompt_tokens > 1  # the template's own tokens count
    assert with_tools.prompt_tokens > bare.prompt_tokens + 100  # the tool's description is in the prompt
    assert with_tools.max_tokens == min(8192, 4096 - with_tools.prompt_tokens)


@pytest.mark.parametrize("shape", ["messages", "prompt"])
def test_the_gateway_counts_exactly_the_tokens_the_worker_encodes(demo_dir: Path, tmp_path: Path, shape: str) -> None:
    """The count that admits a prompt (and answers Anthropic's count_tokens) is the worker's own: the tokenizer
    file read alone merges "23" where the model's tokenizer does not, and adds no special tokens."""
    from mlx_lm.utils import load_tokenizer

    from worker.rows import encode_prompt

    rules = " ".join(f"Rule {i}: answer in plain words about the files." for i in range(40))
    body = {"messages": [{"role": "system", "content": rules}, {"role": "user", "content": "Which?"}]}
    request = ask(prompt=None, **body) if shape == "messages" else ask(prompt=rules)
    fitted = limits(demo_dir, tmp_path).check(request)
    tokenizer = load_tokenizer(Settings(data_dir=demo_dir).builtin_model_dir("tiny"))
    assert fitted.prompt_tokens == len(encode_prompt(tokenizer, request))


def test_tool_definitions_that_do_not_fit_are_named(demo_dir: Path, tmp_path: Path) -> None:
    checker = small_chat_model(demo_dir, tmp_path, context=100)
    assert checker.check(chat()).max_tokens > 0
    with pytest.raises(ContextLengthExceeded) as caught:
        checker.check(chat(tools=[TOOL]))
    assert caught.value.param == "tools"
    total = caught.value.overflow
    assert total is not None and total.context == 100 and total.prompt_tokens == checker_count(checker, tools=[TOOL])
    bare = checker_count(checker)
    # OpenAI's sentence, with the exact numbers: the whole prompt, the messages and the functions.
    assert caught.value.message == (
        f"This model's maximum context length is 100 tokens. However, your messages resulted in "
        f"{total.prompt_tokens} tokens ({bare} in the messages, {total.prompt_tokens - bare} in the functions). "
        "Please reduce the length of the messages or functions."
    )
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 100 tokens") as caught:
        checker.check(chat(messages=[{"role": "user", "content": "word " * 200}]))
    assert caught.value.param == "messages"


def checker_count(checker: PromptLimits, **body: object) -> int:
    """The request's tokens as the gateway counts them, with a context too large to refuse it."""
    model_text = checker._texts.get(checker._models.get("chat"))
    count = model_text.prompt_tokens(chat(**body))
    assert count is not None
    return count


def test_no_character_cap_refuses_a_prompt_whose_tokens_fit(demo_dir: Path, tmp_path: Path) -> None:
    """Unset, the cap is what the context could hold at the longest token: a long prompt within the
    context passes however many characters it has; one past what any tokenizing could fit is refused
    before counting, in OpenAI's words, as at least so many tokens."""
    checker = limits(demo_dir, tmp_path, f'[models.chat]\npath = "{chat_copy(demo_dir, tmp_path, 200_000)}"\n')
    long = "the quick brown fox jumps over the lazy dog. " * 6_000  # 270,000 characters
    fitted = checker.check(chat(messages=[{"role": "user", "content": long}]))
    assert fitted.exact and 50_000 < fitted.prompt_tokens < 200_000
    most = checker._texts.get(checker._models.get("chat")).most_chars()
    assert most is not None
    with pytest.raises(ContextLengthExceeded, match="resulted in at least") as caught:
        checker.check(chat(messages=[{"role": "user", "content": "x" * (most + 1)}]))
    assert caught.value.param == "messages"


def test_an_embedding_request_for_a_hub_model_not_here_yet_is_not_refused_for_its_kind(
    demo_dir: Path, tmp_path: Path
) -> None:
    """Its files say what it is once its pull (which the request starts) brings them; a local generator is
    refused at once."""
    checked = limits(demo_dir, tmp_path, '[models.vectors]\nrepo = "someone/some-embedder"\n').check_embedding(
        EmbedRequest(model="vectors", inputs=["a"])
    )
    assert checked.model == "vectors"
    with pytest.raises(InvalidRequest, match="generates text"):
        limits(demo_dir, tmp_path).check_embedding(EmbedRequest(model="tiny", inputs=["a"]))
    # Nor for a length the gateway cannot know: its limit is in files not here yet (the worker checks it).
    long_ids = EmbedRequest(model="vectors", inputs=[list(range(1, 1001))], truncate=False)
    hub = limits(demo_dir, tmp_path, '[models.vectors]\nrepo = "someone/some-embedder"\nkind = "embed"\n')
    assert hub.check_embedding(long_ids).model == "vectors"


def test_a_short_prompt_is_checked_in_place_only_once_its_tokenizers_are_read(demo_dir: Path, tmp_path: Path) -> None:
    """The gateway checks a short prompt on its event loop (gateway/admission/submission.py): only when that reads
    no file, writes nothing and counts little."""
    checker = small_chat_model(demo_dir, tmp_path, context=4096)
    assert not checker.quick(["chat"], 100)  # its tokenizers not read yet: a file read, on a thread
    checker.warm()
    assert checker.quick(["chat"], 100)
    assert not checker.quick(["chat"], QUICK_CHARS + 1)
    assert not checker.quick(["chat", "nowhere"], 100)  # refused on a thread, as before

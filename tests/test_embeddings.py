"""Embeddings and reranking through the real stack: a gateway, a worker and redis-server, the built-in
`embed` model (a random-weight BERT of mlx-embeddings' own class), and the clients people use, unmodified:
OpenAI's Python SDK, the `ollama` client, LangChain's OpenAIEmbeddings; a rerank as Open WebUI sends it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import ollama
import pytest
from langchain_openai import OpenAIEmbeddings
from mlx_lm import load
from openai import APIStatusError, OpenAI
from pydantic import SecretStr

from shared.embeddings import EmbedRequest
from shared.errors import InvalidRequest
from shared.models import ModelSpec
from shared.settings import Settings
from tests.support.processes import Service
from tests.support.redis_servers import RedisServer
from worker import embedding, reranking
from worker.embedding import EmbedWork
from worker.tiny_families import build_family_model

SENTENCES = [
    "The sea was calm that morning.",
    "A team runs large local models for its staff and for an agent system that fans one task out.",
    "Vectors.",
    "The settings live in shared/settings.py, beside the models file's parser and the defaults.",
]


@pytest.fixture(scope="module")
def judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama served as an LLM reranker (`kind = "rerank"`), as Qwen3-Reranker would be."""
    return build_family_model(tmp_path_factory.mktemp("judge") / "llama", "llama")


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory, judge: Path
) -> Iterator[Service]:
    models = tmp_path_factory.mktemp("embed-models") / "models.toml"
    models.write_text(f'[models.judge]\npath = "{judge}"\nkind = "rerank"\n')
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/11",
        data_dir,
        tmp_path_factory.mktemp("embed-logs"),
        models_file=models,
    )
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service: Service) -> OpenAI:
    return OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def close(a: list[float], b: list[float], tolerance: float = 1e-4) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=tolerance) for x, y in zip(a, b, strict=True))


def test_the_openai_sdk_embeds_one_input_a_list_base64_and_fewer_dimensions(client: OpenAI) -> None:
    one = client.embeddings.create(model="embed", input="hello there", encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 128
    assert one.usage.prompt_tokens > 0 and one.model == "embed"
    assert math.isclose(sum(x * x for x in one.data[0].embedding), 1.0, rel_tol=1e-4)

    listed = client.embeddings.create(model="embed", input=SENTENCES)  # the SDK asks for base64 and decodes it
    assert [d.index for d in listed.data] == [0, 1, 2, 3]
    floats = client.embeddings.create(model="embed", input=SENTENCES, encoding_format="float")
    for decoded, plain in zip(listed.data, floats.data, strict=True):
        assert close(decoded.embedding, plain.embedding, 1e-6)

    short = client.embeddings.create(model="embed", input="hello there", dimensions=32, encoding_format="float")
    assert len(short.data[0].embedding) == 32
    assert math.isclose(sum(x * x for x in short.data[0].embedding), 1.0, rel_tol=1e-4)
    with pytest.raises(APIStatusError) as wide:
        client.embeddings.create(model="embed", input="hello", dimensions=4096)
    assert wide.value.body["param"] == "dimensions"  # type: ignore[index]


def test_vectors_are_the_same_alone_and_batched_and_as_mlx_embeddings_gives_them(
    client: OpenAI, data_dir: Path
) -> None:
    batched = client.embeddings.create(model="embed", input=SENTENCES, encoding_format="float").data
    for sentence, in_batch in zip(SENTENCES, batched, strict=True):
        alone = client.embeddings.create(model="embed", input=sentence, encoding_format="float").data[0]
        assert close(alone.embedding, in_batch.embedding)

    model, tokenizer = embedding.read(Settings(data_dir=data_dir).builtin_model_dir("embed"))
    for sentence, served in zip(SENTENCES, batched, strict=True):
        encoded = tokenizer(sentence, return_tensors="mlx")
        expected = model(encoded["input_ids"], attention_mask=encoded["attention_mask"]).text_embeds[0]
        assert close(expected.astype(mx.float32).tolist(), served.embedding)


def test_a_long_document_is_one_job_run_in_batches(service: Service) -> None:
    chunks = [f"Chunk {n}: " + " ".join(["words about the sea"] * (n % 17 + 1)) for n in range(300)]
    response = service.http.post("/v1/embeddings", json={"model": "embed", "input": chunks}, timeout=300)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 300
    job = service.job(response.headers["x-mlxq-job-id"])
    assert job["status"] == "finished"


def test_langchains_openai_embeddings_against_the_base_url(service: Service) -> None:
    # As LangChain is pointed at a server that is not OpenAI's: its tiktoken-based splitting off.
    embedder = OpenAIEmbeddings(
        model="embed",
        base_url=service.base_url + "/v1",
        api_key=SecretStr("unused"),
        check_embedding_ctx_length=False,
    )
    documents = embedder.embed_documents(SENTENCES)
    query = embedder.embed_query(SENTENCES[0])
    assert len(documents) == 4 and close(documents[0], query)


def test_the_ollama_client_embeds_and_truncates_by_default(service: Service) -> None:
    client = ollama.Client(host=service.base_url)
    answer = client.embed(model="embed", input=SENTENCES)
    assert len(answer.embeddings) == 4 and len(answer.embeddings[0]) == 128
    assert answer.prompt_eval_count and answer.prompt_eval_count > 0
    legacy = client.embeddings(model="embed", prompt=SENTENCES[0])
    assert close(list(legacy.embedding), list(answer.embeddings[0]))

    too_long = " ".join(["the sea and the settings"] * 400)  # past the model's 512 tokens
    cut = client.embed(model="embed", input=too_long)
    assert cut.prompt_eval_count == 512
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model="embed", input=too_long, truncate=False)
    assert refused.value.status_code == 422 or refused.value.status_code == 400
    assert "512" in refused.value.error


def test_token_ids_past_the_vocabulary_are_refused_and_the_worker_lives_on(service: Service, client: OpenAI) -> None:
    # MLX reads past an embedding table without a word (a segfault): the ids are checked first.
    with pytest.raises(APIStatusError) as refused:
        client.embeddings.create(model="embed", input=[[1, 2, 3], [5, 99_999_999]])
    assert refused.value.status_code == 422 and refused.value.body["param"] == "input[1]"  # type: ignore[index]
    assert len(client.embeddings.create(model="embed", input=[[1, 2, 3]]).data[0].embedding) == 128
    assert service.worker.alive()


def test_openai_refuses_an_input_past_the_models_limit(client: OpenAI) -> None:
    with pytest.raises(APIStatusError) as refused:
        client.embeddings.create(model="embed", input=["short", " ".join(["the sea and the settings"] * 400)])
    assert refused.value.body["param"] == "input[1]"  # type: ignore[index]
    assert "512" in refused.value.body["message"]  # type: ignore[index]


def test_an_input_at_the_limit_is_counted_and_refused_alike_by_the_gateway_and_the_worker(
    client: OpenAI, data_dir: Path
) -> None:
    """Counted as the worker encodes it (the model's own tokenizer, its special tokens included): one token past
    the limit is refused, and the gateway's refusal is the worker's, word for word."""
    _, tokenizer = embedding.read(Settings(data_dir=data_dir).builtin_model_dir("embed"))

    def of_tokens(count: int) -> str:
        texts = (("sea " * n).strip() + tail for n in range(count) for tail in ("", "x", " x", ". x"))
        return next(t for t in texts if len(tokenizer.encode(t, add_special_tokens=True)) == count)

    text = of_tokens(513)
    assert len(client.embeddings.create(model="embed", input=of_tokens(512)).data) == 1  # the limit: taken
    with pytest.raises(APIStatusError) as refused:
        client.embeddings.create(model="embed", input=["short", text])
    work = EmbedWork(
        "in-process", EmbedRequest(model="embed", inputs=["short", text], truncate=False), ModelSpec("embed")
    )
    with pytest.raises(InvalidRequest) as worker_refused:
        work.encode(tokenizer, 512, 1 << 20)
    assert refused.value.body["message"] == worker_refused.value.message  # type: ignore[index]
    assert refused.value.body["param"] == worker_refused.value.param == "input[1]"  # type: ignore[index]


def test_a_rerank_as_open_webui_sends_it(service: Service) -> None:
    body = {
        "model": "embed",
        "query": SENTENCES[3],
        "documents": [SENTENCES[0], SENTENCES[3], SENTENCES[1]],
        "top_n": 2,
    }
    response = service.http.post("/v1/rerank", json=body, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    assert results[0]["index"] == 1 and results[0]["document"]["text"] == SENTENCES[3]  # itself, first
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]


def test_an_llm_reranker_judges_each_document_by_its_own_yes_and_no(service: Service, judge: Path) -> None:
    documents = [SENTENCES[0], SENTENCES[3], SENTENCES[1]]
    body = {"model": "judge", "query": SENTENCES[3], "documents": documents, "return_documents": False}
    response = service.http.post("/v1/rerank", json=body, timeout=120)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2] and "document" not in results[0]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)

    # In-process, as its model card computes it: P(yes) against P(no) after the judging prompt.
    model, tokenizer = load(str(judge))[:2]
    yes, no = tokenizer.encode("yes", add_special_tokens=False)[0], tokenizer.encode("no", add_special_tokens=False)[0]
    for result in results:
        ids = tokenizer.encode(reranking.prompt(SENTENCES[3], documents[result["index"]]), add_special_tokens=False)
        logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
        expected = 1 / (1 + math.exp(float(logits[no]) - float(logits[yes])))
        assert math.isclose(result["relevance_score"], expected, abs_tol=1e-4)


def test_generation_and_embedding_models_each_refuse_the_others_work(service: Service, client: OpenAI) -> None:
    with pytest.raises(APIStatusError) as chat:
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(APIStatusError) as vectors:
        client.embeddings.create(model="demo", input="hi")
    assert vectors.value.body["param"] == "model"  # type: ignore[index]
    response = httpx.post(service.base_url + "/api/embed", json={"model": "demo", "input": "hi"}, timeout=30)
    assert response.status_code in (400, 422) and "error" in response.json()


@pytest.mark.parametrize("family", ["llama", "qwen3_next", "gemma3_text"])
def test_a_reranker_reads_only_its_rows_last_logits_where_that_gives_its_own(
    family: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A batch's logits at every position would take gigabytes for a real vocabulary: the head goes over the
    rows' last hidden states only, where that is exactly the model's forward (tried once per load)."""
    model, tokenizer = load(str(build_family_model(tmp_path_factory.mktemp(family) / family, family)))[:2]
    judged = reranking.judge(model, tokenizer)
    assert judged.head_apart
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    whole = replace(judged, head_apart=False)
    apart, full = reranking.forward(model, rows, judged), reranking.forward(model, rows, whole)
    assert [v for [v] in apart] == pytest.approx([v for [v] in full], abs=1e-5)

    class Capped(type(model)):  # type: ignore[misc]
        """Logits its head alone does not give (a family that caps or scales them)."""

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return 2 * super().__call__(*args, **kwargs)

    model.__class__ = Capped
    assert not reranking.judge(model, tokenizer).head_apart

"""The agent clients people use, unmodified, against the real stack: Claude Code (`claude -p`), Codex CLI
(`codex exec`) and the OpenAI Agents SDK with its default model. scripts/test installs the CLIs from
npm into .clients/; without them (no node) their tests skip and say why.

The settings they get are ones a user of the real Anthropic or OpenAI service would use too: a base URL
and a key; some tests use the CLIs' own flags for a short system prompt and few tools, others their
default prompts, as a new user runs them (about 21,000 tokens of the `demo` model's for Claude Code,
8,000 for opencode: the demo counts like a real model). opencode's compaction runs on mlxq's answer to
an overflow (OpenAI's `context_length_exceeded`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.settings import Settings
from tests.support.processes import Service
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.slow

CLIENTS = Path(os.environ.get("MLXQ_TEST_CLIENTS", Path(__file__).parents[1] / ".clients/node_modules/.bin"))
QUIET = {
    # Telemetry, error reports and update checks off: nothing leaves this machine.
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "OPENAI_AGENTS_DISABLE_TRACING": "1",
    "NO_COLOR": "1",
}
SHORT_CONTEXT = 12_000
"""The `short` model's context: opencode's default prompt (about 8,000 tokens) and a turn of 3,000 fit it,
a second turn does not."""
MID_CONTEXT = 40_000
"""The `mid` model's context: Claude Code's default prompt (about 21,500 tokens) and turns of 3,000 and
4,000 fit it, a third of 17,000 does not; the summary of the first two (with Claude Code's prompt) does."""
AGENTS_DEFAULT_MODEL = "gpt-5.6-luna"
"""The Agents SDK's default model (agents.models.get_default_model()), an alias of demo here."""


def binary(name: str) -> Path:
    path = CLIENTS / name
    if not path.exists():
        pytest.skip(f"{name} is not installed at {CLIENTS} (scripts/test installs it with npm)")
    return path


@pytest.fixture(scope="module")
def agents_service(
    redis_server: RedisServer, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A service whose demo model also answers to the Agents SDK's default model name. Its limits are
    the product's own: a random model ends its answer (end of text) after a few hundred tokens on
    average, well inside the ceiling, and Claude Code takes a cut-off answer for an error."""
    models = tmp_path_factory.mktemp("agents-models") / "models.toml"
    demo = Settings(data_dir=data_dir).builtin_model_dir("demo")  # built by the worker as it starts
    models.write_text(
        f'[models.short]\npath = "{demo}"\ncontext_tokens = {SHORT_CONTEXT}\nnotes = "the demo, a short context"\n'
        f'[models.mid]\npath = "{demo}"\ncontext_tokens = {MID_CONTEXT}\nnotes = "the demo, a mid context"\n'
        f'[aliases]\n"{AGENTS_DEFAULT_MODEL}" = "demo"\n'
    )
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/9",
        data_dir,
        tmp_path_factory.mktemp("agents-logs"),
        models_file=models,
        default_max_tokens=None,
        heartbeat_interval_s=0.5,
    )
    # `short` and `mid` are the demo's files, which the worker builds as it starts, beside its serving.
    deadline = time.monotonic() + 180
    while not (demo / "model.safetensors").exists():
        assert time.monotonic() < deadline, "the worker did not build the demo model"
        time.sleep(0.2)
    yield svc
    svc.stop()


def run(command: list[str | Path], env: dict[str, str], cwd: Path, timeout_s: float = 240) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        env={**os.environ, **QUIET, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def claude_env(svc: Service, home: Path) -> dict[str, str]:
    return {"HOME": str(home), "ANTHROPIC_BASE_URL": svc.base_url, "ANTHROPIC_AUTH_TOKEN": "unused"}


def test_claude_code_answers_in_print_mode(agents_service: Service, tmp_path: Path) -> None:
    claude = binary("claude")
    out = run(
        [claude, "--bare", "-p", "say hi", "--model", "demo", "--system-prompt", "Be brief.", "--tools", ""],
        claude_env(agents_service, tmp_path),
        tmp_path,
    )
    assert out.strip()


def test_claude_code_answers_with_its_default_prompt(agents_service: Service, tmp_path: Path) -> None:
    """As the README says it, nothing shortened: its system prompt and every tool, about 21,000 tokens."""
    out = run([binary("claude"), "-p", "say hi", "--model", "demo"], claude_env(agents_service, tmp_path), tmp_path)
    assert out.strip()


def test_claude_code_reads_its_prompt_from_the_cache_on_its_next_turn_and_in_a_new_session(
    agents_service: Service, tmp_path: Path
) -> None:
    """Its default prompt, unmodified: the second turn of a session and the first of a new one (a new
    attribution line, the same system prompt and tools) report cache reads in Anthropic's usage."""
    claude = binary("claude")
    env = {**claude_env(agents_service, tmp_path), "PWD": str(tmp_path)}
    asked = ["-p", "--output-format", "json", "--model", "demo"]

    def usage(out: str) -> dict[str, int]:
        found: dict[str, int] = json.loads(out)["usage"]
        return found

    first = usage(run([claude, *asked, "say hi"], env, tmp_path))
    assert first["input_tokens"] + first.get("cache_read_input_tokens", 0) > 15_000
    again = usage(run([claude, *asked, "--continue", "and again"], env, tmp_path))
    assert again["cache_read_input_tokens"] > 15_000, again
    fresh = usage(run([claude, *asked, "say hello"], env, tmp_path))
    assert fresh["cache_read_input_tokens"] > 15_000, fresh


def test_claude_code_compacts_its_conversation_when_mlxq_says_the_prompt_is_too_long(
    agents_service: Service, tmp_path: Path
) -> None:
    """A third turn that does not fit `mid`'s context: mlxq answers Anthropic's 400 "prompt is too long:
    N tokens > M maximum", Claude Code summarises the conversation (a compact boundary) and answers."""
    claude = binary("claude")
    env = {**claude_env(agents_service, tmp_path), "PWD": str(tmp_path)}
    source = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    run([claude, "-p", "Remember this: " + source[:12_000], "--model", "mid"], env, tmp_path)
    # Claude Code summarises no fewer than two turns.
    run([claude, "-p", "--continue", "And this: " + source[12_000:28_000], "--model", "mid"], env, tmp_path)
    out = run(
        [claude, "-p", "--continue", "And this: " + source[28_000:99_000], "--model", "mid",
         "--output-format", "stream-json", "--verbose"],
        env,
        tmp_path,
    )  # fmt: skip
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(e.get("type") == "system" and e.get("subtype") == "compact_boundary" for e in events), out[-3000:]
    [result] = [e for e in events if e.get("type") == "result"]
    assert result["subtype"] == "success" and not result["is_error"] and result["result"]


def test_claude_code_streams_json_with_a_tool_offered(agents_service: Service, tmp_path: Path) -> None:
    claude = binary("claude")
    out = run(
        [claude, "--bare", "-p", "say hi", "--model", "demo", "--system-prompt", "Be brief.", "--tools", "Read",
         "--output-format", "stream-json", "--verbose"],
        claude_env(agents_service, tmp_path),
        tmp_path,
    )  # fmt: skip
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    [result] = [e for e in events if e.get("type") == "result"]
    assert result["subtype"] == "success" and not result["is_error"] and result["result"]
    assert any(e.get("type") == "assistant" for e in events)


def test_codex_exec_answers_through_the_responses_api(agents_service: Service, tmp_path: Path) -> None:
    codex = binary("codex")
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "demo"\nmodel_provider = "mlxq"\ncheck_for_update_on_startup = false\n'
        "[analytics]\nenabled = false\n"
        f'[model_providers.mlxq]\nname = "mlxq"\nbase_url = "{agents_service.base_url}/v1"\n'
        'wire_api = "responses"\nenv_key = "MLXQ_API_KEY"\n'
    )
    instructions = tmp_path / "instructions.md"
    instructions.write_text("Be brief.\n")
    last = tmp_path / "last.txt"
    run(
        [codex, "exec", "--skip-git-repo-check", "--ephemeral", "-c", f'model_instructions_file="{instructions}"',
         "-c", 'web_search="disabled"', "--disable", "multi_agent", "--disable", "goals", "--disable", "apps",
         "-o", last, "say hi"],
        {"HOME": str(tmp_path), "CODEX_HOME": str(home), "MLXQ_API_KEY": "unused"},
        tmp_path,
    )  # fmt: skip
    assert last.read_text().strip()


def test_the_agents_sdk_with_its_default_model_and_a_function_tool(agents_service: Service) -> None:
    code = f"""
import asyncio
from agents import Agent, Runner, function_tool
from agents.models import get_default_model

assert get_default_model() == {AGENTS_DEFAULT_MODEL!r}, get_default_model()

@function_tool
def get_weather(city: str) -> str:
    \"\"\"The weather in a city.\"\"\"
    return "sunny"

agent = Agent(name="assistant", instructions="Be brief.", tools=[get_weather])
result = Runner.run_sync(agent, "What is the weather in Paris?")
assert result.final_output, result
print(result.final_output)
"""
    env = {"OPENAI_BASE_URL": agents_service.base_url + "/v1", "OPENAI_API_KEY": "unused"}
    out = run([os.sys.executable, "-c", code], env, Path.cwd(), timeout_s=120)
    assert out.strip()


def opencode_project(svc: Service, tmp_path: Path, model: str) -> tuple[dict[str, str], Path]:
    """opencode's own config for an OpenAI-compatible server, as its docs give it, in a project; the
    context it is told is the demo's, so that only the server's answer can make it compact. Its
    environment, and the project to run in."""
    directory, home = tmp_path / "project", tmp_path / "home"  # siblings, as a user's are
    directory.mkdir()
    home.mkdir()
    provider = {
        "npm": "@ai-sdk/openai-compatible",
        "name": "mlxq",
        "options": {"baseURL": svc.base_url + "/v1", "apiKey": "unused"},
        "models": {name: {"name": name, "limit": {"context": 131072, "output": 8192}} for name in ("demo", "short")},
    }
    config = {"provider": {"mlxq": provider}, "model": f"mlxq/{model}", "autoupdate": False, "share": "disabled"}
    (directory / "opencode.json").write_text(json.dumps(config))
    env = {"HOME": str(home), "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1"}
    # opencode takes its project from $PWD, which a subprocess inherits from the test run, not from its cwd.
    return {**env, "PWD": str(directory)}, directory


def opencode_events(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_opencode_answers_with_its_default_prompt(agents_service: Service, tmp_path: Path) -> None:
    opencode = binary("opencode")
    env, project = opencode_project(agents_service, tmp_path, "demo")
    out = run([opencode, "run", "--format", "json", "say hi"], env, project)
    texts = [e for e in opencode_events(out) if e.get("type") == "text"]
    assert texts and not [e for e in opencode_events(out) if e.get("type") == "error"]


def test_opencode_compacts_its_conversation_when_mlxq_says_it_overflows(
    agents_service: Service, tmp_path: Path
) -> None:
    """A second turn that does not fit `short`'s context: mlxq answers 400 `context_length_exceeded` in
    OpenAI's words, opencode takes it for an overflow, summarises the conversation and answers the turn."""
    opencode = binary("opencode")
    env, project = opencode_project(agents_service, tmp_path, "short")
    source = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    first = opencode_events(
        run([opencode, "run", "--format", "json", "Remember this: " + source[:12_000]], env, project)
    )
    [turn] = [e["part"]["tokens"] for e in first if e.get("type") == "step_finish"]  # type: ignore[index]
    done = subprocess.run(
        [str(opencode), "run", "--continue", "--format", "json", "And this: " + source[12_000:20_000]],
        env={**os.environ, **QUIET, **env},
        cwd=project,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )  # it exits 1: it reports the overflow it recovered from
    events = opencode_events(done.stdout)
    errors = [e["error"] for e in events if e.get("type") == "error"]
    assert [error["name"] for error in errors] == ["ContextOverflowError"], done.stdout[-3000:]  # type: ignore[index]
    assert "maximum context length is 12000 tokens" in json.dumps(errors)
    # Then a summary (a request without opencode's own prompt: under half the first turn's), and the turn
    # answered from it.
    summary, answer = [e["part"] for e in events if e.get("type") == "step_finish"]  # type: ignore[index]
    assert prompt_of(summary["tokens"]) < prompt_of(turn) / 2, (summary, turn)
    assert answer["reason"] == "stop", done.stdout[-3000:]


def prompt_of(tokens: dict[str, object]) -> int:
    """A step's prompt as opencode counts it: new input and what the server read from its cache."""
    cache = tokens["cache"]
    assert isinstance(cache, dict)
    return int(str(tokens["input"])) + int(cache["read"])


def project_and_home(tmp_path: Path) -> tuple[Path, Path]:
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    return project, home


def test_qwen_code_answers_with_its_default_prompt(agents_service: Service, tmp_path: Path) -> None:
    """qwen-code's OpenAI provider, as its docs set it: about 15,000 demo tokens of prompt."""
    qwen = binary("qwen")
    project, home = project_and_home(tmp_path)
    (home / ".qwen").mkdir()
    settings = {
        "security": {"auth": {"selectedType": "openai"}},
        "model": {"name": "demo"},
        "privacy": {"usageStatisticsEnabled": False},
        "telemetry": {"enabled": False},
        "general": {"enableAutoUpdate": False},
    }
    (home / ".qwen" / "settings.json").write_text(json.dumps(settings))
    env = {
        "HOME": str(home),
        "PWD": str(project),
        "OPENAI_BASE_URL": agents_service.base_url + "/v1",
        "OPENAI_API_KEY": "unused",
        "OPENAI_MODEL": "demo",
        "QWEN_USAGE_STATISTICS_ENABLED": "false",
        "QWEN_TELEMETRY_ENABLED": "false",
    }
    assert run([qwen, "say hi"], env, project).strip()


def test_continue_cli_answers_with_its_default_prompt(agents_service: Service, tmp_path: Path) -> None:
    """Continue's `cn` with an OpenAI model in its config. (It asks api.continue.dev for its latest version as
    it starts, whatever it is told; without a way out it fails quietly and goes on.)"""
    cn = binary("cn")
    project, home = project_and_home(tmp_path)
    (home / ".continue").mkdir()
    config = home / ".continue" / "config.yaml"
    config.write_text(
        "name: mlxq\nversion: 1.0.0\nschema: v1\nmodels:\n  - name: demo\n    provider: openai\n    model: demo\n"
        f"    apiBase: {agents_service.base_url}/v1\n    apiKey: unused\n    roles:\n      - chat\n"
    )
    env = {
        "HOME": str(home),
        "PWD": str(project),
        "CONTINUE_CLI_ENABLE_TELEMETRY": "0",
        "CONTINUE_METRICS_ENABLED": "0",
    }
    assert run([cn, "-p", "--config", config, "say hi"], env, project).strip()


@pytest.mark.parametrize("provider", ["openai-compatible", "ollama"])
def test_cline_answers_with_its_default_prompt(agents_service: Service, tmp_path: Path, provider: str) -> None:
    """Cline's OpenAI-compatible provider, and its Ollama provider (which sends fields Ollama's API does not
    have: mlxq ignores them as Ollama does). Its settings are the files `cline auth` writes."""
    cline = binary("cline")
    project, home = project_and_home(tmp_path)
    settings = home / ".cline" / "data" / "settings"
    settings.mkdir(parents=True)
    base = agents_service.base_url + ("/v1" if provider == "openai-compatible" else "")
    chosen = {"provider": provider, "model": "demo", "baseUrl": base, "apiKey": "unused"}
    if provider == "ollama":
        del chosen["apiKey"]
    providers = {
        "version": 1,
        "lastUsedProvider": provider,
        "modes": {},
        # Without `updatedAt` the file is not valid to Cline, which then falls back to its own service.
        "providers": {provider: {"settings": chosen, "updatedAt": "2026-01-01T00:00:00.000Z", "tokenSource": "manual"}},
    }
    (settings / "providers.json").write_text(json.dumps(providers))
    (settings / "global-settings.json").write_text(json.dumps({"telemetryOptOut": True, "autoUpdateEnabled": False}))
    env = {
        "HOME": str(home),
        "PWD": str(project),
        "DO_NOT_TRACK": "1",
        "DISABLE_TELEMETRY": "1",
        "CLINE_NO_AUTO_UPDATE": "1",
    }
    before = agents_service.gateway.log.read_text().count("POST /api/chat")
    try:
        assert run([cline, "say hi"], env, project).strip()
    finally:
        stop_cline_daemons(home)
    chats = agents_service.gateway.log.read_text().count("POST /api/chat") - before
    assert chats >= 1 if provider == "ollama" else chats == 0


def stop_cline_daemons(home: Path) -> None:
    """Cline leaves a daemon behind (`--cline-hub-daemon`, on a fixed port): this test's go with it."""
    import psutil

    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            if "--cline-hub-daemon" in (process.info["cmdline"] or []) and (process.info["environ"] or {}).get(
                "HOME"
            ) == str(home):
                process.kill()
        except psutil.Error:
            continue


def test_kilo_answers_with_its_default_prompt(agents_service: Service, tmp_path: Path) -> None:
    """Kilo (an opencode fork) with its own config file in the project: about 13,000 demo tokens."""
    kilo = binary("kilo")
    project, home = project_and_home(tmp_path)
    provider = {
        "npm": "@ai-sdk/openai-compatible",
        "name": "mlxq",
        "options": {"baseURL": agents_service.base_url + "/v1", "apiKey": "unused"},
        "models": {"demo": {"name": "demo", "limit": {"context": 131072, "output": 8192}}},
    }
    config = {"provider": {"mlxq": provider}, "model": "mlxq/demo", "autoupdate": False, "share": "disabled"}
    (project / "kilo.json").write_text(json.dumps(config))
    env = {
        "HOME": str(home),
        "PWD": str(project),
        "KILO_DISABLE_AUTOUPDATE": "1",
        "KILO_DISABLE_MODELS_FETCH": "1",
        "KILO_DISABLE_SESSION_INGEST": "1",
    }
    events = opencode_events(run([kilo, "run", "--format", "json", "say hi"], env, project))
    assert [e for e in events if e.get("type") == "text"] and not [e for e in events if e.get("type") == "error"]

"""The agent clients people use, unmodified, against the real stack: Claude Code (`claude -p`), Codex CLI
(`codex exec`) and the OpenAI Agents SDK with its default model. scripts/test installs the CLIs from
npm into .clients/; without them (no node) their tests skip and say why.

The settings they get are ones a user of the real Anthropic or OpenAI service would use too: a base URL
and a key; for the CLIs, their own flags for a short system prompt and few tools. Their default prompts
(55,000 and 28,000 demo-model tokens) work as well, but take minutes to prefill on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RedisServer, Service

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
    models.write_text(f'[aliases]\n"{AGENTS_DEFAULT_MODEL}" = "demo"\n')
    svc = Service(
        redis_server.url.rsplit("/", 1)[0] + "/9",
        data_dir,
        tmp_path_factory.mktemp("agents-logs"),
        models_file=models,
        default_max_tokens=None,
        heartbeat_interval_s=0.5,
    )
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

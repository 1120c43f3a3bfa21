"""compose/ and the service definitions: they parse and validate.

The compose file is interpolated as Compose does (`${VAR:-default}`, `${VAR:?error}`)
and validated against the Compose Specification's JSON schema, as check-jsonschema
ships it (no container engine needed); the service files are rendered by the real
installer and parsed by the formats' own parsers.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
SECRETS = {"MLXQ_REDIS_PASSWORD": "r3dis", "MLXQ_DASHBOARD_PASSWORD": "d4sh"}


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: `${VAR}`, `${VAR:-default}`, `${VAR:?error}` (and the forms
    without a colon, which treat an empty value as set), `$$` for a dollar."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        found = env.get(name)
        unset = found is None or (operator is not None and operator.startswith(":") and found == "")
        if operator and operator.endswith("?") and unset:
            raise ValueError(f"required variable {name} is missing a value: {argument}")
        if operator and operator.endswith("-") and unset:
            return argument or ""
        return found or ""

    return _VARIABLE.sub(value, text)


def compose_config(env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """The compose file as Compose would read it with `env`, after checking it against the spec."""
    rendered = tmp_path / "docker-compose.json"
    config = yaml.safe_load(interpolate(COMPOSE.read_text(), env))
    rendered.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(rendered)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    loaded: dict[str, Any] = config
    return loaded


def test_the_compose_file_validates_with_its_secrets_set(tmp_path: Path) -> None:
    config = compose_config(SECRETS, tmp_path)
    assert {"redis", "gateway", "dashboard", "worker-cuda"} <= set(config["services"])
    redis = config["services"]["redis"]
    assert "--appendonly" in " ".join(map(str, redis["command"])) and "healthcheck" in redis
    assert "127.0.0.1:11435:11435" in config["services"]["gateway"]["ports"]
    assert config["services"]["gateway"]["environment"]["MLXQ_REDIS_URL"] == "redis://:r3dis@redis:6379/0"


def test_the_compose_file_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MLXQ_REDIS_PASSWORD"):
        compose_config({}, tmp_path)


def render(tmp_path: Path, target: str) -> Path:
    out = tmp_path / target
    env = {**os.environ, "MLXQ_PORT": "11435"}
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/service/install.py"), "--dest", str(out), "--platform", target],
        check=True,
        env=env,
        capture_output=True,
    )
    return out


def test_launchd_agents_run_the_gateway_and_watchdog_with_logs_in_library_logs(tmp_path: Path) -> None:
    out = render(tmp_path, "macos")
    for name, module in (("gateway", "gateway"), ("watchdog", "worker.watchdog")):
        plist = plistlib.loads((out / f"com.mlxq.{name}.plist").read_bytes())
        assert plist["Label"] == f"com.mlxq.{name}"
        assert plist["ProgramArguments"][1:] == ["-m", module]
        assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
        assert plist["StandardOutPath"].endswith(f"Library/Logs/mlxq/{name}.log")
        assert plist["EnvironmentVariables"]["MLXQ_PORT"] == "11435"
        assert plist["ExitTimeOut"] > 10  # beyond the watchdog's own grace period
    if shutil.which("plutil"):
        subprocess.run(["plutil", "-lint", *map(str, out.iterdir())], check=True)


def test_systemd_units_verify(tmp_path: Path) -> None:
    out = render(tmp_path, "linux")
    units = sorted(out.glob("mlxq-*.service"))
    assert [u.name for u in units] == ["mlxq-gateway.service", "mlxq-watchdog.service"]
    text = (out / "mlxq-watchdog.service").read_text()
    assert "ExecStart=" in text and "-m worker.watchdog" in text and "TimeoutStopSec=20" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

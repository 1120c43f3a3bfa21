"""compose/ and the service definitions: they parse and validate with the real tools."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
SECRETS = {"MLXQ_REDIS_PASSWORD": "r3dis", "MLXQ_DASHBOARD_PASSWORD": "d4sh"}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose (Debian's package) is not installed; scripts/test installs it where apt can")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLXQ_")}
    return subprocess.run(
        [tool, "-f", str(COMPOSE), "--profile", "cuda", "config"], env={**clean, **env}, capture_output=True, text=True
    )


def test_the_compose_file_validates_with_its_secrets_set() -> None:
    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    rendered = result.stdout
    for service in ("redis:", "gateway:", "dashboard:", "worker-cuda:"):
        assert service in rendered
    assert "--appendonly" in rendered and "healthcheck:" in rendered
    assert "127.0.0.1:11435:11435" in rendered


def test_the_compose_file_refuses_to_start_without_its_secrets() -> None:
    result = compose_config({})
    assert result.returncode != 0
    assert "MLXQ_REDIS_PASSWORD" in result.stderr


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

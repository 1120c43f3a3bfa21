"""Render (and install) service definitions for the gateway and the watchdog.

macOS: launchd agents in ~/Library/LaunchAgents, logs in ~/Library/Logs/mlxq/.
Linux: systemd user units in ~/.config/systemd/user, logs in the journal.
The MLXQ_* variables set when this runs are written into the definitions, so the
services run with the configuration they were installed with.
"""

from __future__ import annotations

import argparse
import os
import platform
import plistlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"gateway": "gateway", "watchdog": "worker.watchdog"}
STOP_GRACE_S = 20
"""What launchd/systemd wait after SIGTERM: the watchdog's own 10 s grace, plus margin."""


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("MLXQ_") or k == "HF_HOME"}
    env.setdefault("MLXQ_DATA_DIR", str(ROOT / "var"))
    if (ROOT / "models.toml").exists():
        env.setdefault("MLXQ_MODELS_FILE", str(ROOT / "models.toml"))
    return env


def launchd_plist(name: str, python: Path, logs: Path) -> bytes:
    return plistlib.dumps(
        {
            "Label": f"com.mlxq.{name}",
            "ProgramArguments": [str(python), "-m", SERVICES[name]],
            "WorkingDirectory": str(ROOT),
            "EnvironmentVariables": environment(),
            "RunAtLoad": True,
            "KeepAlive": True,
            "ExitTimeOut": STOP_GRACE_S,
            "StandardOutPath": str(logs / f"{name}.log"),
            "StandardErrorPath": str(logs / f"{name}.log"),
        }
    )


def systemd_unit(name: str, python: Path) -> str:
    env_lines = "\n".join(f'Environment="{k}={v}"' for k, v in sorted(environment().items()))
    after = "network-online.target" if name == "gateway" else "network-online.target mlxq-gateway.service"
    return f"""[Unit]
Description=mlxq {name}
After={after}

[Service]
Type=simple
WorkingDirectory={ROOT}
ExecStart={python} -m {SERVICES[name]}
{env_lines}
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec={STOP_GRACE_S}

[Install]
WantedBy=default.target
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("services", nargs="*", help="gateway, watchdog (default: both)")
    parser.add_argument("--dest", type=Path, help="write the files here and install nothing")
    parser.add_argument(
        "--platform", choices=["macos", "linux"], default="macos" if platform.system() == "Darwin" else "linux"
    )
    args = parser.parse_args()
    python = Path(os.environ.get("MLXQ_PYTHON", ROOT / ".venv/bin/python"))
    home = Path.home()
    macos = args.platform == "macos"
    dest = args.dest or (home / "Library/LaunchAgents" if macos else home / ".config/systemd/user")
    dest.mkdir(parents=True, exist_ok=True)
    logs = home / "Library/Logs/mlxq"
    written = []
    unknown = set(args.services) - set(SERVICES)
    if unknown:
        parser.error(f"unknown services {sorted(unknown)}; choose from {sorted(SERVICES)}")
    for name in args.services or list(SERVICES):
        if macos:
            path = dest / f"com.mlxq.{name}.plist"
            path.write_bytes(launchd_plist(name, python, logs))
        else:
            path = dest / f"mlxq-{name}.service"
            path.write_text(systemd_unit(name, python))
        written.append(path)
        print(f"wrote {path}")
    if args.dest:
        return
    if macos:
        logs.mkdir(parents=True, exist_ok=True)
        for path in written:
            subprocess.run(["launchctl", "bootout", f"gui/{os.getuid()}", str(path)], check=False)
            subprocess.run(["launchctl", "bootstrap", f"gui/{os.getuid()}", str(path)], check=True)
        print(f"loaded; logs in {logs}")
    else:
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "--user", "enable", "--now", *[p.name for p in written]], check=True)
        print("enabled and started; logs: journalctl --user -u 'mlxq-*'")


if __name__ == "__main__":
    sys.exit(main())

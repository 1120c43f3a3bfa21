"""rq-dashboard for mlxq: `python -m gateway.dashboard` (what scripts/dashboard runs).

It runs rq-dashboard against the configured Redis with RQ's JSON serializer,
bound to 127.0.0.1 unless told otherwise, behind basic auth when a password is
set. rq-dashboard 0.9 imports `six` without declaring it; mlxq's `dashboard`
extra installs it.
"""

from __future__ import annotations

import sys
from typing import Any

from shared.settings import Settings


def arguments(settings: Settings) -> list[str]:
    args = [
        "--json",
        "--redis-url",
        settings.redis_url,
        "--bind",
        settings.dashboard_host,
        "--port",
        str(settings.dashboard_port),
    ]
    if settings.dashboard_password:
        args += ["--username", settings.dashboard_username, "--password", settings.dashboard_password]
    return args


def main() -> None:
    settings = Settings()
    try:
        from rq_dashboard import cli
    except ImportError as exc:
        sys.exit(f"rq-dashboard is not installed ({exc}); install mlxq with the `dashboard` extra")
    command: Any = cli.run
    command.main(args=arguments(settings), prog_name="mlxq-dashboard", auto_envvar_prefix="RQ_DASHBOARD")


if __name__ == "__main__":
    main()

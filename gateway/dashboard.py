"""rq-dashboard for mlxq: `python -m gateway.dashboard` (what scripts/dashboard runs).

It runs rq-dashboard against the configured Redis with RQ's JSON serializer,
bound to 127.0.0.1 unless told otherwise, behind basic auth when a password is
set. One gap in rq-dashboard 0.9 is closed here: its requeue buttons call RQ's
`requeue_job` without the serializer, which unpickles our JSON jobs and fails.
"""

from __future__ import annotations

import sys
from typing import Any

from redis import Redis
from rq.job import Job, requeue_job
from rq.serializers import JSONSerializer

from shared.settings import Settings


def _requeue_json_job(job_id: str, connection: Redis) -> Job:
    return requeue_job(job_id, connection=connection, serializer=JSONSerializer)


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
        from rq_dashboard import cli, web
    except ImportError as exc:
        sys.exit(f"rq-dashboard is not installed ({exc}); install mlxq with the `dashboard` extra")
    web.requeue_job = _requeue_json_job
    command: Any = cli.run
    command.main(args=arguments(settings), prog_name="mlxq-dashboard", auto_envvar_prefix="RQ_DASHBOARD")


if __name__ == "__main__":
    main()

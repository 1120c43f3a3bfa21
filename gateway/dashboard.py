"""rq-dashboard for mlxq: `python -m gateway.dashboard` (what scripts/dashboard runs).

It runs rq-dashboard against the configured Redis with RQ's JSON serializer,
bound to 127.0.0.1 unless told otherwise, behind basic auth when a password is
set. rq-dashboard 0.9 imports `six` without declaring it; mlxq's `dashboard`
extra installs it.

Two places in rq-dashboard 0.9 ignore the serializer it is given, and `adapt()`
mends them before it serves: its workers list hydrates workers with RQ's pickle
serializer (a busy worker's current job then fails to load: the workers page
answers 500), and its job page decodes dependency ids as bytes (RQ 3 gives str:
any job with a dependency answered 500). Both are rq-dashboard's to fix upstream;
until then these two subclasses are what it uses.
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


def adapt() -> None:
    """Make rq-dashboard read workers and jobs the way mlxq writes them (JSON, RQ 3)."""
    from redis import Redis
    from rq import Queue, Worker
    from rq.job import Job
    from rq.serializers import JSONSerializer
    from rq.worker.base import BaseWorker
    from rq_dashboard import web

    class JsonWorker(Worker):
        @classmethod
        def all(
            cls,
            connection: Redis | None = None,
            job_class: type[Job] | None = None,
            queue_class: type[Queue] | None = None,
            queue: Queue | None = None,
            serializer: Any = None,
        ) -> list[BaseWorker]:
            return Worker.all(connection, job_class, queue_class, queue, serializer=JSONSerializer)

    class DashboardJob(Job):
        @property
        def dependency_ids(self) -> list[Any]:
            return [i.encode() if isinstance(i, str) else i for i in super().dependency_ids]

    web.Worker = JsonWorker
    web.Job = DashboardJob


def main() -> None:
    settings = Settings()
    try:
        from rq_dashboard import cli
    except ImportError as exc:
        sys.exit(f"rq-dashboard is not installed ({exc}); install mlxq with the `dashboard` extra")
    adapt()
    command: Any = cli.run
    command.main(args=arguments(settings), prog_name="mlxq-dashboard", auto_envvar_prefix="RQ_DASHBOARD")


if __name__ == "__main__":
    main()

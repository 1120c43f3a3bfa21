"""rq-dashboard for mlxq: `python -m gateway.operations.dashboard` (what scripts/dashboard runs).

It runs rq-dashboard against the configured Redis with RQ's JSON serializer,
bound to 127.0.0.1 unless told otherwise, behind basic auth: with
MLXQ_DASHBOARD_PASSWORD, or one generated on first start (kept owner-only in the
data directory and printed, as notebook servers do) unless MLXQ_DASHBOARD_AUTH is
false. It shows no prompt text (job arguments, a synthesis's filled prompt)
unless MLXQ_DESCRIBE_PROMPTS is set, and refuses a state-changing request (delete,
requeue, empty) that does not come from its own pages (a same-origin check), so
another site open in the operator's browser cannot drive it. rq-dashboard 0.9
imports `six` without declaring it; mlxq's `dashboard` extra installs it.

Two places in rq-dashboard 0.9 ignore the serializer it is given, and `adapt()`
mends them before it serves: its workers list hydrates workers with RQ's pickle
serializer (a busy worker's current job then fails to load: the workers page
answers 500), and its job page decodes dependency ids as bytes (RQ 3 gives str:
any job with a dependency answered 500). Both are rq-dashboard's to fix upstream;
until then these two subclasses are what it uses.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any
from urllib.parse import urlparse

from shared.settings import Settings

HIDDEN = "(arguments hidden: MLXQ_DESCRIBE_PROMPTS shows them)"


def credential(settings: Settings) -> tuple[str, str] | None:
    """(user, password) the dashboard asks for; None when auth is explicitly off."""
    if settings.dashboard_password:
        return settings.dashboard_username, settings.dashboard_password
    if not settings.dashboard_auth:
        return None
    path = settings.data_dir.expanduser() / "dashboard-password"
    password = path.read_text().strip() if path.exists() else ""
    if not password:  # none yet, or an empty file a crash left: an empty password would let anyone in
        path.parent.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(18)
        # Owner-only from its first byte (created 0600 under another name, not chmod-ed after), and
        # whole when it takes its name.
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        with open(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(password + "\n")
        os.replace(draft, path)
    print(f"rq-dashboard: user {settings.dashboard_username}, password {password} (kept in {path})", flush=True)
    return settings.dashboard_username, password


def arguments(settings: Settings, login: tuple[str, str] | None = None) -> list[str]:
    args = [
        "--json",
        "--redis-url",
        settings.redis_url,
        "--bind",
        settings.dashboard_host,
        "--port",
        str(settings.dashboard_port),
    ]
    if login is not None:
        args += ["--username", login[0], "--password", login[1]]
    return args


def adapt(describe_prompts: bool = False) -> None:
    """Make rq-dashboard read workers and jobs the way mlxq writes them (JSON, RQ 3), keep prompts out
    of its pages, and refuse state changes from other origins."""
    from redis import Redis
    from rq import Queue, Worker
    from rq.job import Job
    from rq.worker.base import BaseWorker
    from rq_dashboard import web

    from shared.json_bytes import JobSerializer

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
            return Worker.all(connection, DashboardJob, queue_class, queue, serializer=JobSerializer)

    class DashboardJob(Job):
        @property
        def dependency_ids(self) -> list[Any]:
            return [i.encode() if isinstance(i, str) else i for i in super().dependency_ids]

        def get_call_string(self) -> str | None:
            return super().get_call_string() if describe_prompts else f"{self.func_name}{HIDDEN}"

        def get_meta(self, refresh: bool = True) -> dict[str, Any]:
            meta = super().get_meta(refresh)
            return meta if describe_prompts else {k: v for k, v in meta.items() if k != "synthesis_input"}

    web.Worker = JsonWorker
    web.Job = DashboardJob
    if not describe_prompts:
        # RQ_DASHBOARD_SHOW_FULL_ARGS would print every job's arguments, prompts included.
        web.format_job_description = lambda job: job.description
    web.blueprint.before_request(_same_origin_only)


def _same_origin_only() -> Any:
    """Refuse a state change the dashboard's own pages did not send (they send their Origin)."""
    from flask import abort, request

    if request.method in ("GET", "HEAD", "OPTIONS"):
        if "/requeue/" in request.path:
            abort(405)  # requeue-everything answers GET too: a link or an <img> could fire it
        return None
    origin = request.headers.get("Origin") or request.headers.get("Referer") or ""
    if urlparse(origin).netloc != request.host:
        abort(403)
    return None


def main() -> None:
    settings = Settings()
    try:
        from rq_dashboard import cli
    except ImportError as exc:
        sys.exit(f"rq-dashboard is not installed ({exc}); install mlxq with the `dashboard` extra")
    adapt(settings.describe_prompts)
    login = credential(settings)
    if login is None:
        print("rq-dashboard: no credential asked (MLXQ_DASHBOARD_AUTH=false)", flush=True)
    command: Any = cli.run
    command.main(args=arguments(settings, login), prog_name="mlxq-dashboard", auto_envvar_prefix="RQ_DASHBOARD")


if __name__ == "__main__":
    main()

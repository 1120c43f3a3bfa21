"""`mlxq`: the operator's command, a client of a running service's HTTP API (nothing local).

`MLXQ_URL` (default http://127.0.0.1:11435) says which service, `MLXQ_API_KEY` as
whom (an admin key where keys are set). Built on typer (commands, help) and rich
(tables, the progress bar, `mlxq top`'s live view). An error is the API's own
message and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

app = typer.Typer(help="Manage and watch a running mlxq service.", no_args_is_help=True, add_completion=False)
console = Console()
TIMEOUT = httpx.Timeout(30.0, read=None)


class Failed(Exception):
    """What the service (or the network) said went wrong, for the person at the terminal."""


def _client() -> httpx.Client:
    url = os.environ.get("MLXQ_URL", "http://127.0.0.1:11435").rstrip("/")
    key = os.environ.get("MLXQ_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT)


def _said(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or body)


def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """The API's answer to one call; raises Failed with its message."""
    with _client() as client:
        try:
            response = client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise Failed(f"cannot reach mlxq at {client.base_url}: {exc}") from exc
    if response.status_code >= 400:
        raise Failed(_said(response))
    return response.json() if response.content else {}


def lines(path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A streamed answer's JSON lines."""
    with _client() as client:
        try:
            with client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise Failed(_said(response))
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.HTTPError as exc:
            raise Failed(f"cannot reach mlxq at {client.base_url}: {exc}") from exc


def size(value: Any) -> str:
    if not value:
        return "-"
    number = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if number < 1000 or unit == "TB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1000
    return str(value)


def when(epoch: Any) -> str:
    if epoch is None:
        return "-"
    left = float(epoch) - time.time()
    return "now" if left <= 0 else (f"in {left / 60:.0f} min" if left >= 90 else f"in {left:.0f} s")


@app.command()
def models() -> None:
    """The models that may be requested: where from, size, loaded, pinned, warm, downloaded."""
    table = Table("name", "kind", "source", "size", "loaded", "pin", "warm", "here", "aliases", box=None)
    for m in call("GET", "/v1/models")["data"]:
        pull = m.get("pull") or {}
        here = "yes" if m.get("downloaded") else "no"
        if pull.get("state") in ("queued", "downloading"):
            here = f"pulling {pull.get('percent') or 0:.0f} %"
        loaded = "yes" if m.get("loaded") else "-"
        mark = {True: "yes", False: "-"}
        table.add_row(
            m["id"],
            m.get("kind") or "generate",
            m.get("source") or "",
            size(m.get("size_bytes")),
            loaded,
            mark[bool(m.get("pin"))],
            mark[bool(m.get("warm"))],
            here,
            ", ".join(m.get("aliases") or []),
        )
    console.print(table)


@app.command()
def ps() -> None:
    """Loaded models per worker: memory, requests running, when each unloads if idle."""
    status = call("GET", "/v1/admin/status")
    table = Table(
        "worker", "model", "size", "active", "pinned", "unloads", "rows", "memory", "kept", "on disk", box=None
    )
    for worker in status["workers"]:
        memory = worker.get("memory") or {}
        rows = f"{worker.get('rows', 0)}/{worker.get('batch_limit', '?')}"
        used = f"{float(memory.get('used_percent', 0)):.0f} %"
        for m in worker.get("models") or [{"name": "(none)"}]:
            pinned = "yes" if m.get("pinned") else "-"
            table.add_row(
                worker["name"],
                m["name"],
                size(m.get("size_bytes")),
                str(m.get("active_requests", "")),
                pinned,
                when(m.get("expires_at")) if m.get("state") == "loaded" else m.get("state", "-"),
                rows,
                used,
                size(worker.get("prefix_cache_bytes")),
                size(worker.get("prefix_disk_bytes")) + ("" if worker.get("prefix_disk_writing", True) else " (full)"),
            )
    console.print(table if status["workers"] else "no live worker")
    console.print(cache_reads(status))


def cache_reads(status: dict[str, Any]) -> str:
    """How much of the prompts so far came from kept caches, and what the workers keep now."""
    counted = status.get("prompt_tokens") or {}
    cached, computed = float(counted.get("cached", 0)), float(counted.get("computed", 0))
    rate = f"{100 * cached / (cached + computed):.0f} %" if cached + computed else "-"
    kept = sum(int(w.get("prefix_cache_bytes") or 0) for w in status["workers"])
    on_disk = sum(int(w.get("prefix_disk_bytes") or 0) for w in status["workers"])
    hits = {tier: 0 for tier in ("lookups", "memory", "disk")}
    for worker in status["workers"]:
        for tier in hits:
            hits[tier] += int((worker.get("prefix_hits") or {}).get(tier) or 0)
    tiers = (
        f"prompts starting from a kept prefix: {hits['memory']} from memory, {hits['disk']} from disk,"
        f" of {hits['lookups']}"
    )
    return (
        f"prompt tokens read from kept caches: {rate} ({cached:.0f} of {cached + computed:.0f}); {tiers};"
        f" kept now {size(kept)} in memory, {size(on_disk)} on disk"
    )


@app.command()
def pull(
    repo: Annotated[str, typer.Argument(help="a hub repo, owner/name")],
    name: Annotated[str | None, typer.Option(help="the model's name here (default: the repo)")] = None,
    pin: Annotated[bool, typer.Option(help="never unload it to make room or when idle")] = False,
    warm: Annotated[bool, typer.Option(help="load it as soon as a worker starts")] = False,
) -> None:
    """Download a hub model, with a progress bar; it answers requests as soon as it is here."""
    body: dict[str, Any] = {"repo": repo, "stream": True} | ({"name": name} if name else {})
    body |= {"pin": True} if pin else {}
    body |= {"warm": True} if warm else {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"pulling {repo}", total=None)
        last: dict[str, Any] = {}
        for record in lines("/v1/admin/models/pull", body):
            last = record
            progress.update(task, total=record.get("total_bytes") or None, completed=record.get("done_bytes", 0))
    if last.get("state") == "failed":
        raise Failed(f"pull of {repo} failed: {last.get('error')}")
    console.print(f"pulled {repo} as model '{last.get('name', name or repo)}'")


@app.command()
def add(
    name: str,
    path: Annotated[str | None, typer.Option(help="a local model directory")] = None,
    repo: Annotated[str | None, typer.Option(help="a hub repo (pulled on its first request)")] = None,
    pin: bool = False,
    warm: bool = False,
) -> None:
    """Add a model to the registry (a local directory or a hub repo), no restart needed."""
    entry: dict[str, Any] = {k: v for k, v in (("path", path), ("repo", repo)) if v}
    entry |= {k: True for k, v in (("pin", pin), ("warm", warm)) if v}
    call("PUT", f"/v1/admin/models/{name}", entry)
    console.print(f"added model '{name}'")


@app.command()
def rm(name: str) -> None:
    """Remove a model the API added (and the files its pull fetched); running jobs finish first."""
    done = call("DELETE", f"/v1/admin/models/{name}")
    freed = f", {size(done.get('freed_bytes'))} freed" if done.get("freed_bytes") else ""
    console.print(f"removed model '{done['model']}'{freed}")


@app.command()
def load(name: str) -> None:
    """Load a model now, before its first request."""
    done = call("POST", f"/v1/admin/models/{name}/load")
    console.print(f"asked {len(done['workers'])} worker(s) to load '{done['model']}'")


@app.command()
def unload(name: str) -> None:
    """Unload a model as soon as it is idle."""
    done = call("POST", f"/v1/admin/models/{name}/unload")
    console.print(f"asked {len(done['workers'])} worker(s) to unload '{done['model']}'")


@app.command()
def pin(name: str, off: Annotated[bool, typer.Option("--off", help="unpin it")] = False) -> None:
    """Pin a model (never unloaded to make room or when idle), or with --off unpin it."""
    done = call("PATCH", f"/v1/admin/models/{name}", {"pin": not off})
    console.print(f"model '{done['model']}' {'unpinned' if off else 'pinned'}")


@app.command()
def jobs() -> None:
    """Jobs queued and running, and how many each owner has."""
    listing = call("GET", "/v1/admin/jobs")
    table = Table("job", "state", "where", "owner", "model", "age", box=None)
    now = time.time()
    for job in listing["jobs"]:
        age = f"{now - job['created_at']:.0f} s" if job.get("created_at") else "-"
        where = job.get("queue") or job.get("worker") or ""
        table.add_row(job["id"], job["state"], where, str(job.get("owner")), str(job.get("model")), age)
    console.print(table if listing["jobs"] else "no job queued or running")
    for owner, counts in sorted(listing["by_owner"].items()):
        console.print(f"{owner}: {counts['queued']} queued, {counts['running']} running")


BLOCKS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """The last `width` values as block characters, scaled to the largest."""
    shown = values[-width:]
    top = max(shown, default=0) or 1
    return "".join(BLOCKS[min(8, round(8 * v / top))] for v in shown).rjust(width)


class Top:
    """`mlxq top`'s state: the samples of the last minutes, and the view made of them."""

    def __init__(self, keep: int = 300) -> None:
        self.samples: deque[dict[str, Any]] = deque(maxlen=keep)
        self.series: dict[str, deque[float]] = {k: deque(maxlen=keep) for k in ("queued", "rows", "tok_s", "mem")}

    def sample(self) -> None:
        status = call("GET", "/v1/admin/status")
        workers = status["workers"]
        tokens = sum(float(w.get("tokens_generated") or 0) for w in workers)
        rate = 0.0
        if self.samples:
            before = self.samples[-1]
            span = status["at"] - before["at"]
            rate = max(0.0, tokens - before["tokens"]) / span if span > 0 else 0.0
        used = max((float((w.get("memory") or {}).get("used_percent", 0)) for w in workers), default=0.0)
        self.samples.append({"at": status["at"], "tokens": tokens, "status": status})
        self.series["queued"].append(float(sum(status["queues"].values())))
        self.series["rows"].append(float(sum(w.get("rows", 0) for w in workers)))
        self.series["tok_s"].append(rate)
        self.series["mem"].append(used)

    def view(self) -> Group:
        status = self.samples[-1]["status"]
        workers = status["workers"]
        limits = status["thresholds"]
        lines = Table(box=None, show_header=False)
        rows, room = sum(w.get("rows", 0) for w in workers), sum(w.get("batch_limit") or 0 for w in workers)
        queued = " ".join(f"{k} {v}" for k, v in status["queues"].items())
        used = self.series["mem"][-1]
        colour = "red" if used >= limits["critical_percent"] else "yellow" if used >= limits["warning_percent"] else ""
        memory = Text(
            f"{used:.0f} %  (warning {limits['warning_percent']:.0f}, critical {limits['critical_percent']:.0f})",
            style=colour,
        )
        lines.add_row("queued", f"{queued}", sparkline(list(self.series["queued"])))
        lines.add_row("batch", f"{rows}/{room} rows", sparkline(list(self.series["rows"])))
        lines.add_row("tokens/s", f"{self.series['tok_s'][-1]:.1f}", sparkline(list(self.series["tok_s"])))
        lines.add_row("memory", memory, sparkline(list(self.series["mem"])))
        lines.add_row("cache", cache_reads(status), "")
        held = Table("worker", "state", "models", "held / budget", box=None)
        for w in workers:
            names = ", ".join(m["name"] + (" (pinned)" if m.get("pinned") else "") for m in w.get("models") or [])
            budget = f"{size(w.get('model_held_bytes'))} / {size(w.get('model_budget_bytes'))}"
            held.add_row(w["name"], str(w.get("engine_state") or w.get("state")), names or "-", budget)
        pulling = [f"pulling {p['name']}: {p.get('percent') or 0:.0f} %" for p in status.get("pulls", [])]
        title = Text(f"mlxq at {os.environ.get('MLXQ_URL', 'http://127.0.0.1:11435')}", style="bold")
        return Group(title, lines, held if workers else Text("no live worker"), *map(Text, pulling))


@app.command()
def top(
    interval: Annotated[float, typer.Option(help="seconds between samples")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="print one view (two samples apart) and exit")] = False,
) -> None:
    """A live view: queue depth, batch occupancy, tokens per second and memory, with small plots."""
    watch = Top()
    watch.sample()
    if once:
        time.sleep(interval)
        watch.sample()
        console.print(watch.view())
        return
    with Live(watch.view(), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(interval)
            watch.sample()
            live.update(watch.view())


def main() -> None:
    try:
        app()
    except Failed as exc:
        console.print(f"[red]mlxq: {exc}[/red]", highlight=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

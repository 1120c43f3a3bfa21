"""Every Redis key mlxq writes, and its TTL, in one place.

RQ keeps its own keys under `rq:`; these are the few things RQ does not keep.
"""

from __future__ import annotations

PREFIX = "mlxq"

CANCEL_TTL_S = 24 * 3600
"""A cancel flag outlives any job it could still apply to."""


def worker_heartbeat(worker_name: str) -> str:
    """JSON snapshot a worker refreshes every heartbeat interval; expires when it goes silent."""
    return HEARTBEAT_AFFIXES[0] + worker_name + HEARTBEAT_AFFIXES[1]


def worker_commands(worker_name: str) -> str:
    """List of JSON commands for one worker (e.g. unload a model), drained by its monitor thread."""
    return f"{PREFIX}:worker:{worker_name}:commands"


def worker_suspect(worker_name: str) -> str:
    """The job a worker runs that was running when an earlier worker died and has not yet shown it
    was not the cause: if this worker dies too, only that job is counted for it (worker/supervision/orphans.py)."""
    return f"{PREFIX}:worker:{worker_name}:suspect"


def worker_claimed(worker_name: str) -> str:
    """List of job ids a worker popped from a queue and has not yet marked started: what a crash in
    between would otherwise lose (the watchdog puts them back)."""
    return f"{PREFIX}:worker:{worker_name}:claimed"


WORKER_MODELS = f"{PREFIX}:workers:models"
"""Hash: worker name -> the model of the last job it claimed (other workers leave that model's jobs to it)."""


def worker_prefixes(worker_name: str) -> str:
    """Set of the routing names of the prompt blocks a worker holds, in memory or on disk
    (shared/prefix_blocks.py); expires with its heartbeat."""
    return PREFIXES_AFFIXES[0] + worker_name + PREFIXES_AFFIXES[1]


HEARTBEAT_AFFIXES = (f"{PREFIX}:worker:", ":heartbeat")
"""worker_heartbeat(name) is the name between these (for claim.lua)."""

PREFIXES_AFFIXES = (f"{PREFIX}:worker:", ":prefixes")
"""worker_prefixes(name) likewise."""

CLAIMING_WORKERS = f"{PREFIX}:workers:claiming"
"""Set of worker names that have had a claimed list, so a new watchdog finds a dead worker's claims."""

WORKER_COMMANDS_TTL_S = 3600
"""Commands for a worker that never reads them (it died) do not pile up."""


def job_cancel(job_id: str) -> str:
    """Set by the gateway to stop a running job; polled by the worker between tokens."""
    return f"{PREFIX}:job:{job_id}:cancel"


CIRCUIT = f"{PREFIX}:circuit"
"""Hash: the circuit-breaker record the watchdog writes and the gateway reads (shared/circuit.py)."""

WORKER_MEMORY = f"{PREFIX}:workers:memory"
"""Hash: worker name -> "used_percent at_ms" (Redis time), refreshed with each heartbeat."""

JOB_ENDS = f"{PREFIX}:jobs:ended"
HEALTH_PROBE = f"{PREFIX}:health:probe"
"""String /health and each watchdog tick write (with a short TTL) to learn whether Redis takes writes."""

WORKER_CAPACITY = f"{PREFIX}:workers:capacity"
"""Hash: worker -> "jobs_per_s at_ms": what it can drain (its batch over its recent jobs' duration)."""
"""Sorted set: job id -> when it ended (ms, Redis time); the drain rate behind Retry-After."""

REFUSALS = f"{PREFIX}:admission:refused"
"""Hash: refusal reason -> count since the counters were created."""

ADMITTED = f"{PREFIX}:admission:admitted"
"""Counter: jobs admitted."""


def client_rate(client_id: str) -> str:
    """Sorted set: request id -> admitted at (ms); a client's sliding rate window. TTL = the window."""
    return f"{PREFIX}:client:{client_id}:rate"


def client_inflight(client_id: str, tier: str) -> str:
    """Sorted set: job id -> admitted at (ms); a client's queued or running jobs of one tier (`single`
    or `batch`, each with its own cap). TTL = result TTL."""
    return f"{PREFIX}:client:{client_id}:inflight:{tier}"


BATCH_OWNERS = f"{PREFIX}:batch-tier:owners"
"""Hash: job id -> client tag, for jobs in the batch queue that wait their client's turn."""

BATCH_RING = f"{PREFIX}:batch-tier:ring"
"""List of client tags with jobs waiting in the batch queue, in serving order (round robin)."""


def batch_turns(client_tag: str) -> str:
    """List of one client's job ids in the batch queue, oldest first."""
    return f"{PREFIX}:batch-tier:turns:{client_tag}"


WAKE = f"{PREFIX}:queues:wake"
"""List an idle worker blocks on to hear that work arrived (every claim goes through claim.lua)."""

WAKE_MAX = 16
"""Wake tokens kept; an idle worker needs one, a busy one looks anyway."""


EVENTS = f"{PREFIX}:events"
"""Stream of supervision events (shared/events.py)."""

EVENTS_MAXLEN = 10_000
"""Events kept, roughly (XADD MAXLEN ~)."""


def job_stream(job_id: str) -> str:
    """Stream of a job's life: status changes, text as it is generated, and how it ended."""
    return f"{PREFIX}:job:{job_id}:stream"


STREAMS_WRITTEN = f"{PREFIX}:streams:written"
"""Stream of notices, one for each write to job or batch streams, naming the streams written (space-separated,
field `k`): a gateway's stream reader blocks on it and reads only the streams it names, not every stream it
follows on every token (shared/job_stream.py `notice`)."""

STREAMS_WRITTEN_MAXLEN = 10_000
"""Notices kept, roughly: a reader that falls further behind finds what it missed in its sweep."""


def hub_wake(hub_id: str) -> str:
    """Stream a gateway's stream reader reads beside the job streams it follows: an entry added when a
    stream is opened ends the reader's blocked XREAD at once, so the new stream is read without waiting
    for that read's timeout."""
    return f"{PREFIX}:hub:{hub_id}:wake"


HUB_WAKE_TTL_S = 600
"""A gateway that died leaves its wake stream behind this long at most (each wake refreshes it)."""

HUB_WAKE_MAXLEN = 16
"""Entries a wake stream keeps: only the newest one's id matters."""


def batch(batch_id: str) -> str:
    """JSON record of a batch: its children (job ids, custom ids) and its synthesis job. TTL = result TTL."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_ended(batch_id: str) -> str:
    """Hash: custom id -> 1 for each child whose end is recorded (field "" once all have ended)."""
    return f"{PREFIX}:batch:{batch_id}:ended"


def batch_stream(batch_id: str) -> str:
    """Stream of a batch's progress: one `child` entry as each child ends, then `children_done` or `end`."""
    return f"{PREFIX}:batch:{batch_id}:stream"


BATCH_KEPT_S = 24 * 3600
"""A batch's record is kept this long after its last child ended (none before: its synthesis needs it)."""

OPEN_BATCHES = f"{PREFIX}:batches:open"
"""Set of batch ids whose children have not all ended; swept by the watchdog for ends nobody recorded."""


def idempotency(client_id: str, key: str) -> str:
    """`sha256-of-request id`: what an Idempotency-Key was first used for. TTL = idempotency TTL."""
    return f"{PREFIX}:client:{client_id}:idem:{key}"


STATS_JOBS = f"{PREFIX}:stats:jobs"
"""Hash: final job status (finished, failed, canceled) -> jobs that ended so."""

STATS_COUNTERS = f"{PREFIX}:stats:counters"
"""Hash: tokens_generated, prompt_tokens_computed, prompt_tokens_cached, worker_restarts -> running totals."""


def stats_histogram(name: str) -> str:
    """Hash: one histogram (shared/stats.py): bucket bound -> count, plus sum and count."""
    return f"{PREFIX}:stats:histogram:{name}"


def response(response_id: str) -> str:
    """A stored Responses API response (`store: true`): its items, its job, its last known state."""
    return f"{PREFIX}:response:{response_id}"


MODELS = f"{PREFIX}:models"
"""Hash: model name -> JSON entry the admin API wrote (models added, pulled, copied, pinned); laid
over the models file's entry of the same name (shared/live_models.py)."""

MODELS_VERSION = f"{PREFIX}:models:version"
"""Counter moved with every change to MODELS: registries re-read when it moves."""


def pull(name: str) -> str:
    """Hash: one model's download (shared/pulls.py): state, repo, bytes done and in all, error, who."""
    return f"{PREFIX}:pull:{name}"


PULLS = f"{PREFIX}:pulls"
"""Set of model names with a pull record (any state)."""

PULLING = f"{PREFIX}:pulls:pending"
"""Set of model names whose download is queued or running: claim.lua leaves their jobs waiting."""

PULL_TTL_S = 7 * 24 * 3600
"""A finished or failed pull's record is kept this long (for `mlxq pull`'s status and /api/pull)."""

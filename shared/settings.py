"""Settings for every mlxq process, read from `MLXQ_*` environment variables.

Each entry point builds one `Settings` and passes it down; nothing reads the
environment behind its back, so tests build their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]
"""A list given in the environment as `a,b,c`."""


class Settings(BaseSettings):
    """All knobs, with the defaults of the system mlxq replaces."""

    model_config = SettingsConfigDict(env_prefix="MLXQ_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 11435
    redis_connections: int = Field(
        default=32,
        ge=2,
        description="Redis connections per gateway process for its async calls, and as many again for its "
        "threaded ones, however many streams are open (one reader "
        "serves them all); a request that finds every one in use for 10 s is answered 503 gateway_busy",
    )

    models_file: Path | None = Field(
        default=None, description="TOML file naming the models that may be requested; `demo` is always there"
    )
    data_dir: Path = Field(default=Path("~/.cache/mlxq").expanduser(), description="where the demo model is built")

    queue_interactive: str = Field(default="mlxq-interactive", description="OpenAI-compatible calls")
    queue_name: str = Field(default="mlxq-jobs", description="submit-and-poll jobs, and batch syntheses")
    queue_batch: str = Field(default="mlxq-batch", description="batch children, and jobs asking for low priority")
    openai_wait_s: float = Field(default=600.0, description="a non-streaming call waits this long, then 504 + job id")
    stream_ttl_s: int = Field(default=3600, description="a job's token stream is kept this long after it ends")
    idempotency_ttl_s: int = Field(default=24 * 3600, description="how long an Idempotency-Key is remembered")
    max_batch_requests: int = Field(default=256, ge=1, description="children one batch may have")
    batch_sweep_interval_s: float = Field(
        default=5.0, description="how often the watchdog looks for batches whose children ended unrecorded"
    )

    api_keys: CommaList = Field(default=[], description="when set, every /v1 request needs one as a Bearer token")
    admin_keys: CommaList = Field(
        default=[], description="keys that may also call /v1/admin routes and see every client's jobs"
    )
    trusted_proxies: CommaList = Field(
        default=[], description="addresses or networks whose X-Forwarded-For is believed"
    )
    cors_origins: CommaList = Field(
        default=[], description="browser origins allowed to call the API (e.g. https://chat.example); none by default"
    )
    max_body_bytes: int = 4 * 1024 * 1024
    unread_limit_s: float = Field(
        default=120.0,
        gt=0,
        description="a client that leaves its response unread this long (its socket full) is let go, and a "
        "stream's job canceled as on a hang-up",
    )
    body_read_limit_s: float = Field(
        default=30.0, gt=0, description="a request body that stops arriving this long is answered 408"
    )
    rate_limit_requests: int = Field(default=30, ge=1, description="submissions per client per window")
    rate_limit_window_s: int = 60
    max_inflight_per_client: int = Field(
        default=20, ge=1, description="interactive and normal jobs one client may have queued or running"
    )
    max_batch_inflight_per_client: int = Field(
        default=512, ge=1, description="batch children (and low-priority jobs) one client may have queued or running"
    )
    max_queued: int = Field(
        default=1024, ge=1, description="generations waiting in all queues together before 503 queue_full"
    )
    drain_window_s: int = Field(default=300, description="how far back job ends count for the drain rate")
    refusal_hold_s: float = Field(
        default=0.5, description="a gateway repeats a refusal from memory this long (0: always ask Redis)"
    )
    queue_full_fallback_retry_after_s: int = Field(
        default=30, description="Retry-After for queue_full while no job has ended in the drain window"
    )

    max_batch: int = Field(default=16, ge=1, description="jobs a worker runs together in one batch")
    prefill_step_size: int = Field(
        default=2048, ge=16, description="most prompt tokens in one piece of prefill, all of its rows together"
    )
    prefill_pause_steps: float = Field(
        default=3.5,
        gt=1,
        description="a turn that prefills a piece of a prompt takes at most this many decode turns' time: "
        "the longest pause a running stream sees, in its normal gaps (measured by the worker)",
    )
    prefill_batch_size: int = Field(default=8, ge=1, description="prompts arriving together, prefilled together")
    prefix_cache_fraction: float = Field(
        default=0.1,
        ge=0,
        le=0.5,
        description="share of the model budget kept for computed prompt prefixes (0 turns prefix reuse off)",
    )
    prefix_disk_bytes: int | None = Field(
        default=None,
        ge=0,
        description="bytes of computed prompt prefixes kept on disk under the data directory, across restarts"
        " (default: a quarter of the free space there, at most 64 GiB; 0 turns the disk tier off)",
    )
    reload_models: str = Field(
        default="",
        description="set by the watchdog for the worker it starts after a death: the models the dead one held,"
        " comma-separated, loaded again at start",
    )
    prefix_wait_s: float = Field(
        default=3.0,
        ge=0,
        description="how long a job waits for the worker that holds its prompt's start before another takes it",
    )
    default_max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="tokens a request without `max_tokens` may generate (unset: up to the context and the cap)",
    )
    max_tokens_cap: int = Field(
        default=8192, ge=1, description="most tokens one generation may run to; a larger `max_tokens` is a ceiling"
    )
    max_prompt_chars: int | None = Field(
        default=None,
        ge=1,
        description="a prompt with more characters is refused before its tokens are counted (unset: as many as "
        "the model's context could hold, each token as long as its tokenizer's longest)",
    )
    job_timeout_s: int = Field(default=600, description="a generation running longer is stopped")
    result_ttl_s: int = Field(default=24 * 3600, description="how long finished results stay readable")
    failure_ttl_s: int = Field(default=7 * 24 * 3600, description="how long failed jobs stay readable")
    response_ttl_s: int = Field(
        default=30 * 24 * 3600, ge=60, description="how long a stored Responses API response (store: true) is kept"
    )

    worker_name: str | None = None
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: int = Field(default=10, description="a worker silent this long is presumed hung")
    cancel_poll_interval_s: float = Field(default=0.2, description="how often a worker checks cancel flags")

    model_budget_bytes: int | None = Field(
        default=None, description="bytes a worker may hold in models; default a fraction of device memory"
    )
    model_budget_fraction: float = Field(default=0.75, gt=0, le=1)
    keep_alive_s: int = Field(default=300, description="an idle model is unloaded after this long")
    swap_after_s: float = Field(
        default=30.0,
        ge=0,
        description="a busy worker takes a job for another model (then drains its batch and swaps) once the job"
        " has waited this long and its last swap is as old: at most one swap per this many seconds",
    )
    maintenance_interval_s: float = Field(default=1.0, description="how often an idle engine checks memory")

    workers: int = Field(default=1, ge=1, description="worker processes the watchdog keeps running")
    watchdog_tick_s: float = 0.2
    watchdog_probe_interval_s: float = Field(default=10.0, description="how often the watchdog probes a worker")
    watchdog_probe_failures: int = Field(default=3, description="failed probes in a row before a worker is hung")
    watchdog_start_timeout_s: float = Field(default=120.0, description="a worker not ready by then failed to start")
    watchdog_load_timeout_s: float = Field(default=900.0, description="longest a model load may stall the engine")
    restart_backoff_base_s: float = Field(default=2.0, description="restart delay = min(base * 2^n, max)")
    restart_backoff_max_s: float = 60.0
    restart_limit: int = Field(default=5, description="restarts allowed per restart window")
    restart_window_s: float = 300.0
    healthy_reset_s: float = Field(default=60.0, description="healthy this long, a worker's failure count resets")
    circuit_failure_threshold: int = Field(default=5, description="failed starts in a row that open the circuit")
    circuit_open_s: float = Field(default=60.0, description="how long the circuit stays open before a trial")
    stop_grace_s: float = Field(default=10.0, description="SIGTERM, then SIGKILL after this long")
    max_crash_attempts: int = Field(default=3, description="worker deaths a running job may witness")
    watchdog_pid: int | None = Field(default=None, description="set by the watchdog for the workers it starts")

    memory_warning_percent: float = 85.0
    memory_critical_percent: float = 95.0
    memory_emergency_percent: float = 98.0
    memory_retry_after_s: int = Field(default=15, description="Retry-After while memory is in emergency")

    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 9181
    dashboard_username: str = "mlxq"
    dashboard_password: str | None = Field(
        default=None,
        description="the dashboard's basic-auth password; unset, one is generated on first start and kept in "
        "MLXQ_DATA_DIR/dashboard-password",
    )
    dashboard_auth: bool = Field(default=True, description="false: the dashboard asks no credential (a trusted host)")
    describe_prompts: bool = Field(
        default=False, description="put a job's first words in its description (shown by rq-dashboard and RQ logs)"
    )

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("api_keys", "admin_keys", "trusted_proxies", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def queue_names(self) -> list[str]:
        """Every queue, highest priority first: the order a worker listens in."""
        return [self.queue_interactive, self.queue_name, self.queue_batch]

    def builtin_model_dir(self, name: str) -> Path:
        """Where a built-in model (`demo`, `tiny`) is built."""
        return self.data_dir.expanduser() / "models" / name

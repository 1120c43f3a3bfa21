"""Settings for every mlxq process, read from `MLXQ_*` environment variables.

Each entry point builds one `Settings` and passes it down; nothing reads the
environment behind its back, so tests build their own.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All knobs, with the defaults of the system mlxq replaces."""

    model_config = SettingsConfigDict(env_prefix="MLXQ_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 11435

    models_file: Path | None = Field(
        default=None, description="TOML file naming the models that may be requested; `demo` is always there"
    )
    data_dir: Path = Field(
        default=Path("~/.cache/mlxq").expanduser(), description="where the demo model is built"
    )

    queue_name: str = "mlxq-jobs"

    default_max_tokens: int = 256
    max_tokens_cap: int = Field(default=8192, description="largest `max_tokens` a request may ask for")
    max_prompt_chars: int = 200_000
    job_timeout_s: int = Field(default=600, description="a generation running longer is stopped")
    result_ttl_s: int = Field(default=24 * 3600, description="how long finished results stay readable")
    failure_ttl_s: int = Field(default=7 * 24 * 3600, description="how long failed jobs stay readable")

    worker_name: str | None = None
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: int = Field(default=10, description="a worker silent this long is presumed hung")
    cancel_poll_interval_s: float = Field(default=0.2, description="how often a worker checks cancel flags")

    memory_warning_percent: float = 85.0
    memory_critical_percent: float = 95.0

    log_level: str = "INFO"

    @property
    def demo_model_dir(self) -> Path:
        return self.data_dir.expanduser() / "models" / "demo"

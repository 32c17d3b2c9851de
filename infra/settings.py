"""Process settings, read once from `FEDQ_*` environment variables in each entrypoint."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.logs import LogFormat
from schemas.messages import Codec

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class ConnectionSettings(BaseSettings):
    """Where the broker and the store are; `memory://` selects the in-process peers."""

    model_config = SettingsConfigDict(env_prefix="FEDQ_", extra="ignore")

    amqp_url: str = DEFAULT_AMQP_URL
    redis_url: str = DEFAULT_REDIS_URL
    # Socket timeout for Redis commands: big model values need more than a cache's default.
    redis_timeout_seconds: float = Field(default=120.0, gt=0)
    publish_timeout_seconds: float = Field(default=60.0, gt=0)
    # /healthz, /readyz and /metrics on this port; None serves nothing, 0 picks a free port.
    metrics_port: int | None = Field(default=None, ge=0, le=65_535)
    # All interfaces by default: Prometheus and Docker probe from outside the container.
    metrics_host: str = "0.0.0.0"


class AggregatorSettings(ConnectionSettings):
    """Settings of `python -m aggregator`."""

    job: str
    # Unacked deliveries the broker may hand over at once; at least the strategy's buffer.
    prefetch: int | None = Field(default=None, ge=1, le=65_535)
    # Drain mode: exit after this many seconds without a message (tests, batch replays).
    idle_exit_seconds: float | None = Field(default=None, gt=0)
    # Edge mode (FEDQ_UPSTREAM): forward partial updates to this root job instead of
    # committing versions; the job's model mirrors the root's (docs/operations.md).
    upstream: str | None = Field(default=None, min_length=1, max_length=64)
    # Edge mode: the device id (default `edge-{job}`) and key the edge publishes upstream as.
    device_id: str = ""
    device_key_file: Path | None = None
    # Edge mode: forward a group that has waited this long even if it has fewer than K.
    edge_flush_seconds: float = Field(default=10.0, gt=0)
    # torch's intra-op threads for decoding, folding and encoding; None: one for a model
    # under 4 MiB (aggregator/runner.py: 1 MB updates drain 15% faster), else torch's
    # default (one per core: on 2 cores, 1 thread made a 500 MB update 25% slower).
    torch_threads: int | None = Field(default=None, ge=1, le=1024)
    log_level: str = "INFO"
    # FEDQ_LOG_FORMAT: `text` (readable) or `json` (one object per line, for log pipelines).
    log_format: LogFormat = "text"


class AgentSettings(ConnectionSettings):
    """Settings of `python -m device_agent` (a training device or the evaluator)."""

    job: str
    role: str = Field(default="agent", pattern="^(agent|evaluator)$")
    # Empty means: derive from the hostname, which is distinct per container replica.
    device_id: str = ""
    updates: int | None = Field(default=None, ge=1)
    num_devices: int | None = Field(default=None, ge=1)
    dirichlet: float | None = Field(default=None, gt=0)
    # Extra wall time as a multiple of the measured compute time (emulates slow hardware).
    slowdown: float = Field(default=1.0, ge=1.0, le=1000.0)
    # How updates travel: none, fp16, bf16, int8, int8:channel or topk:FRACTION.
    codec: Codec = "none"
    max_versions: int | None = Field(default=None, ge=1)
    # FEDQ_DEVICE_KEY_FILE: the device's private key (base64 of 32 raw bytes, from
    # `fedq device add`); every update is signed with it when set.
    device_key_file: Path | None = None
    # Partial updates: FEDQ_TRAINABLE_ONLY sends only parameters with requires_grad;
    # FEDQ_SEND_KEYS (comma-separated) sends only those keys and freezes the rest.
    trainable_only: bool = False
    send_keys: str = ""
    log_level: str = "INFO"
    # FEDQ_LOG_FORMAT: `text` (readable) or `json` (one object per line, for log pipelines).
    log_format: LogFormat = "text"

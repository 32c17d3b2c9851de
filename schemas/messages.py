"""Pydantic wire contracts: the update header, the job config and a version's metadata.

Every model is frozen and strict, and every string, number and collection is bounded, so a
hostile header costs a bounded amount of memory and is rejected with a field-level error.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from schemas.digests import PayloadHash

# 2: the payload's digest is `payload_blake3` (schemas/digests.py); 1 had `payload_sha256`.
SCHEMA_VERSION = 2


def accepted_schema_versions(current: int) -> frozenset[int]:
    """Return the header schema versions a reader of `current` accepts: it and the one before.

    A rolling upgrade updates the aggregator first; until every agent runs the new release,
    updates of both schemas arrive (docs/operations.md, "Upgrade").
    """
    return frozenset(range(max(1, current - 1), current + 1))


def _accepted_schema(version: int) -> int:
    accepted = accepted_schema_versions(SCHEMA_VERSION)
    if version not in accepted:
        raise ValueError(f"schema_version {version} is not one of {sorted(accepted)}")
    return version


# Identifiers double as AMQP routing keys and Redis key parts: keep them to a safe alphabet.
JobId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
DeviceId = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$")
]
UpdateId = Annotated[
    str,
    Field(
        min_length=36,
        max_length=36,
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    ),
]
# A 32-byte digest in lowercase hex (SHA-256, or BLAKE3 at its default length).
Sha256Hex = Annotated[str, Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]
Blake3Hex = Sha256Hex
Version = Annotated[int, Field(ge=0, le=2**53)]
MetricName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, ge=-1e30, le=1e30)]
Metrics = Annotated[dict[MetricName, FiniteFloat], Field(max_length=32)]
Timestamp = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]

MAX_PAYLOAD_BYTES = 2**40
UpdateKind = Literal["delta", "weights"]
# `all`: the payload holds every key of the job's model schema. `partial`: any non-empty
# subset of them (say only the trainable ones); the aggregator leaves the other keys as they are.
UpdateKeys = Literal["all", "partial"]
# A cast (none, fp16, bf16), int8 quantization (per tensor or per channel), or top-k
# sparsification keeping FRACTION of the entries, 0 < FRACTION <= 1 (schemas/compression.py).
CODEC_PATTERN = r"^(none|fp16|bf16|int8|int8:channel|topk:([01]|[01]?\.[0-9]{1,8}))$"


def _check_codec(codec: str) -> str:
    if codec.startswith("topk:") and not 0 < float(codec.removeprefix("topk:")) <= 1:
        raise ValueError("topk FRACTION must be in (0, 1]")
    return codec


Codec = Annotated[
    str, StringConstraints(max_length=16, pattern=CODEC_PATTERN), AfterValidator(_check_codec)
]
PayloadMode = Literal["inline", "blob"]
DType = Literal["float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class UpdateHeader(_Frozen):
    """The AMQP headers of one model update (the body holds the encoded tensors)."""

    schema_version: Annotated[int, AfterValidator(_accepted_schema)] = SCHEMA_VERSION
    job: JobId
    update_id: UpdateId
    device_id: DeviceId
    base_version: Version
    num_samples: int = Field(ge=1, le=10**9)
    kind: UpdateKind = "delta"
    keys: UpdateKeys = "all"
    codec: Codec = "none"
    payload: PayloadMode = "inline"
    # Exactly one of the two: agents of this release send BLAKE3, those of schema 1 SHA-256.
    payload_blake3: Blake3Hex | None = None
    payload_sha256: Sha256Hex | None = None
    payload_bytes: int = Field(ge=0, le=MAX_PAYLOAD_BYTES)
    train_metrics: Metrics = Field(default_factory=dict)
    sent_at: Timestamp
    signature: str | None = Field(default=None, max_length=512)

    @model_validator(mode="after")
    def _one_payload_digest(self) -> UpdateHeader:
        if (self.payload_blake3 is None) == (self.payload_sha256 is None):
            raise ValueError("exactly one of payload_blake3 and payload_sha256 must be given")
        return self

    @property
    def payload_digest(self) -> tuple[PayloadHash, str]:
        """Return the payload's hash algorithm and the hex digest the header records."""
        if self.payload_blake3 is not None:
            return "blake3", self.payload_blake3
        assert self.payload_sha256 is not None  # _one_payload_digest
        return "sha256", self.payload_sha256


class TensorSpec(_Frozen):
    """The shape and dtype one named tensor of the model must have."""

    shape: tuple[Annotated[int, Field(ge=0, le=2**31)], ...] = Field(max_length=8)
    dtype: DType


class StalenessConfig(_Frozen):
    """Which staleness function s(tau) weights an update, and its parameters."""

    name: Literal["constant", "polynomial", "hinge", "sqrt"] = "polynomial"
    a: float = Field(default=0.5, ge=0, le=100)
    b: int = Field(default=4, ge=0, le=10_000)


class StrategyConfig(_Frozen):
    """How the aggregator folds updates into the global model."""

    name: Literal["fedasync", "fedbuff", "fedavg"] = "fedbuff"
    staleness: StalenessConfig = StalenessConfig()
    max_staleness: int = Field(default=20, ge=0, le=10_000)
    # FedAsync mixing weight alpha (scaled by s(tau)).
    alpha: float = Field(default=0.6, gt=0, le=1)
    # FedBuff buffer size K; FedAvg waits for this many updates per round.
    buffer_size: int = Field(default=4, ge=1, le=10_000)
    server_lr: float = Field(default=1.0, gt=0, le=1000)
    server_optimizer: Literal["none", "fedavgm", "fedadam", "fedyogi"] = "none"
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, le=1)
    weighting: Literal["samples", "uniform"] = "samples"
    # Robustness against untrusted devices (docs/robust.md). None: no clipping.
    clip_norm: float | None = Field(default=None, gt=0, le=1e30)
    # FedBuff and FedAvg: how the buffer is reduced; median and trimmed_mean keep all K deltas.
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    # trimmed_mean drops floor(trim_fraction * K) values from each end of every coordinate.
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5)


class TrainingConfig(_Frozen):
    """How every device of the job trains locally and how the data is split among them."""

    local_epochs: int = Field(default=2, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65_536)
    lr: float = Field(default=0.05, gt=0, le=100)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    prox_mu: float = Field(default=0.0, ge=0, le=100)
    num_devices: int = Field(default=8, ge=1, le=1_000_000)
    dirichlet_alpha: float = Field(default=0.5, gt=0, le=1e6)
    seed: int = Field(default=0, ge=0, le=2**31)


class JobConfig(_Frozen):
    """Everything the aggregator and agents of one job agree on, stored at `fedq:{J}:config`."""

    job: JobId
    task: str = Field(min_length=1, max_length=64)
    strategy: StrategyConfig = StrategyConfig()
    training: TrainingConfig = TrainingConfig()
    model_schema: dict[Annotated[str, Field(max_length=256)], TensorSpec] = Field(
        min_length=1, max_length=100_000
    )
    inline_limit_bytes: int = Field(default=4 * 2**20, ge=0, le=128 * 2**20)
    max_update_bytes: int = Field(default=2**30, ge=1, le=MAX_PAYLOAD_BYTES)
    keep_versions: int = Field(default=4, ge=2, le=10_000)
    blob_ttl_seconds: int = Field(default=3600, ge=1, le=30 * 86400)
    created_at: Timestamp
    # Device authentication (docs/security.md): refuse updates not signed by a registered,
    # unrevoked device key. Off by default, so jobs created before it behave as they did.
    require_signatures: bool = False
    # Refuse an update whose `sent_at` is older than this (a replay of an old capture).
    # None: no age limit. Measured against the aggregator's clock when it sees the update.
    max_update_age_seconds: float | None = Field(default=None, gt=0, le=365 * 86400)
    # Each device publishes as its own broker user, named like the device: refuse an update
    # whose device id is not the AMQP user_id RabbitMQ validated. Off: jobs keep shared users.
    bind_device_users: bool = False

    @property
    def versions_kept(self) -> int:
        """How many versions the store keeps: enough for FedAsync to find any admitted base."""
        return max(self.keep_versions, self.strategy.max_staleness + 1)


class VersionMeta(_Frozen):
    """What went into one committed global version, stored at `fedq:{J}:meta:{v}`."""

    version: Version
    created_at: Timestamp
    sha256: Sha256Hex
    model_bytes: int = Field(ge=0, le=MAX_PAYLOAD_BYTES)
    contributors: list[UpdateId] = Field(default_factory=list, max_length=100_000)
    devices: list[DeviceId] = Field(default_factory=list, max_length=100_000)
    staleness: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=100_000)
    num_samples: int = Field(default=0, ge=0)
    # Payload bytes of the contributing updates as they crossed the wire.
    update_bytes: int = Field(default=0, ge=0)
    eval: Metrics | None = None

    @model_validator(mode="after")
    def _one_entry_per_contributor(self) -> VersionMeta:
        if not len(self.contributors) == len(self.devices) == len(self.staleness):
            raise ValueError("contributors, devices and staleness must have equal lengths")
        return self

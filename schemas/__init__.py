"""Wire contracts and the tensor codec; imports nothing else of fedq and does no I/O."""

from schemas.errors import RejectReason, Rejection
from schemas.messages import (
    SCHEMA_VERSION,
    JobConfig,
    StalenessConfig,
    StrategyConfig,
    TensorSpec,
    TrainingConfig,
    UpdateHeader,
    VersionMeta,
)

__all__ = [
    "SCHEMA_VERSION",
    "JobConfig",
    "RejectReason",
    "Rejection",
    "StalenessConfig",
    "StrategyConfig",
    "TensorSpec",
    "TrainingConfig",
    "UpdateHeader",
    "VersionMeta",
]

"""Wire contracts and the tensor codec; imports nothing else of fedq and does no I/O."""

from schemas.errors import Rejection, RejectReason
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

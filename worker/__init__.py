"""tpns-batcher: turn a stream of TPNS account bind/unbind intents into the fewest correct calls."""

from .aproducer import AsyncProducer
from .errors import (
    ConfigError,
    CredentialsError,
    IdConflictError,
    IntentError,
    PermanentError,
    QueueFullError,
    StoreUnavailableError,
    TpnsBatcherError,
    TpnsError,
    TransientError,
)
from .model import Account, Intent, Status
from .producer import BulkResult, Producer
from .settings import Settings

__all__ = [
    "Account",
    "AsyncProducer",
    "BulkResult",
    "ConfigError",
    "CredentialsError",
    "IdConflictError",
    "Intent",
    "IntentError",
    "PermanentError",
    "Producer",
    "QueueFullError",
    "Settings",
    "Status",
    "StoreUnavailableError",
    "TpnsBatcherError",
    "TpnsError",
    "TransientError",
]

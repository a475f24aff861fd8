"""The public surface is small and pinned: a change to it is a decision, not an accident."""

import worker


def test_the_package_exports_exactly_its_public_api() -> None:
    assert sorted(worker.__all__) == [
        "Account", "BulkResult", "ConfigError", "CredentialsError", "IdConflictError", "Intent",
        "IntentError", "PermanentError", "Producer", "QueueFullError", "Settings", "Status",
        "StoreUnavailableError", "TpnsBatcherError", "TpnsError", "TransientError",
    ]
    for name in worker.__all__:
        assert getattr(worker, name) is not None


def test_every_error_has_one_root() -> None:
    for name in ("ConfigError", "CredentialsError", "IdConflictError", "IntentError", "PermanentError",
                 "QueueFullError", "StoreUnavailableError", "TpnsError", "TransientError"):
        assert issubclass(getattr(worker, name), worker.TpnsBatcherError)

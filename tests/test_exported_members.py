"""The public surface is small and pinned: a change to it is a decision, not an accident."""

import worker
import worker.errors


def test_the_package_exports_exactly_its_public_api() -> None:
    assert sorted(worker.__all__) == [
        "Account", "AsyncProducer", "BulkResult", "ConfigError", "CredentialsError", "IdConflictError", "Intent",
        "IntentError", "PermanentError", "Producer", "QueueFullError", "Settings", "Status",
        "StoreUnavailableError", "TpnsBatcherError", "TpnsError", "TransientError",
    ]
    star: dict[str, object] = {}
    exec("from worker import *", star)
    assert sorted(k for k in star if not k.startswith("__")) == sorted(worker.__all__)
    for name in worker.__all__:
        exported = getattr(worker, name)
        # the class of that name from its own module, not an alias or a placeholder
        assert isinstance(exported, type) and exported.__name__ == name, name
        assert getattr(__import__(exported.__module__, fromlist=[name]), name) is exported, name


def test_every_error_has_one_root() -> None:
    errors = [cls for cls in vars(worker.errors).values()
              if isinstance(cls, type) and issubclass(cls, BaseException)]
    assert worker.IntentError in errors and worker.TransientError in errors
    for cls in errors:
        assert issubclass(cls, worker.TpnsBatcherError), cls.__name__
    # the tree at the top of errors.py names every class defined there
    doc = worker.errors.__doc__ or ""
    assert sorted(c.__name__ for c in errors if c.__name__ not in doc) == []

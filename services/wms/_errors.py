"""Where what a ctrl_bps WMS service raises becomes a flowbus error, in one place.

``BaseWmsService`` methods a service does not implement raise ``NotImplementedError``: that is
``UnknownOperation("<op> is not supported by <class path>")``. Bad input the service refuses is
``BackendRejected``, a WMS it cannot reach ``BackendUnavailable``, and anything else a plugin
raises ``BackendProtocolError`` naming the class path (all chained).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from flowbus.schemas import (
    BackendError,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
    UnknownOperation,
)


@contextlib.contextmanager
def wms_errors(operation: str, class_path: str) -> Iterator[None]:
    """Translate what a WMS service raises; ``NotImplementedError`` means "not supported"."""
    try:
        yield
    except BackendError:
        raise
    except NotImplementedError:
        raise UnknownOperation(f"{operation} is not supported by {class_path}") from None
    except (FileNotFoundError, NotADirectoryError, PermissionError, KeyError, ValueError, TypeError,
            ImportError) as exc:
        raise BackendRejected(f"{operation}: {type(exc).__name__}: {exc}") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise BackendUnavailable(f"{operation}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # anything else a plugin raises, named and chained
        raise BackendProtocolError(f"{operation}: {class_path} raised {type(exc).__name__}: {exc}") from exc


def call_service(target: Any, class_path: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """``target.<method>(*args, **kwargs)`` with errors translated; an absent method is not supported."""
    func = getattr(target, method, None)
    if not callable(func):
        raise UnknownOperation(f"{method} is not supported by {class_path}")
    with wms_errors(method, class_path):
        return func(*args, **kwargs)


__all__ = ["call_service", "wms_errors"]

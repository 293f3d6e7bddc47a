"""Where what a ctrl_bps WMS service raises becomes a flowbus error, in one place.

``BaseWmsService`` methods a service does not implement raise ``NotImplementedError``: that is
``UnknownOperation("<op> is not supported by <class path>")``. Bad input the service refuses is
``BackendRejected``, a WMS it cannot reach ``BackendUnavailable``, and anything else a plugin
raises ``BackendProtocolError`` naming the class path (all chained).
"""

from __future__ import annotations

import contextlib
import inspect
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
    """``target.<method>(*args, **kwargs)`` with errors translated; an absent method is not supported.

    Keyword arguments go by ``BaseWmsService``'s documented signature: one the plugin's method does
    not take is left out while it has its documented default (an older plugin without
    ``is_global`` or ``return_exit_codes`` still works), and refused, naming it, when a caller set it."""
    func = getattr(target, method, None)
    if not callable(func):
        raise UnknownOperation(f"{method} is not supported by {class_path}")
    kwargs = _accepted(func, class_path, method, kwargs)
    with wms_errors(method, class_path):
        return func(*args, **kwargs)


def _accepted(func: Any, class_path: str, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin or C callable: pass everything on
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    documented = _documented(method)
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in params:
            out[name] = value
        elif name in documented and documented[name] == value:
            continue  # the documented default: the plugin's own behaviour is the same
        else:
            raise BackendRejected(f"{method}: {class_path}.{method}() does not take {name!r} "
                                  f"(its arguments: {', '.join(p for p in params if p != 'self')})")
    return out


def _documented(method: str) -> dict[str, Any]:
    """The defaults of ``BaseWmsService.<method>``'s keyword arguments."""
    from lsst.ctrl.bps import BaseWmsService

    base = getattr(BaseWmsService, method, None)
    if base is None:
        return {}
    return {n: p.default for n, p in inspect.signature(base).parameters.items()
            if p.default is not inspect.Parameter.empty}


__all__ = ["call_service", "wms_errors"]

"""Which adapter serves which session config (imported lazily: backend libraries are heavy)."""

from __future__ import annotations

from flowbus.schemas import (
    ConfigError,
    EcflowSessionConfig,
    GuiserverSessionConfig,
    QcgSessionConfig,
    SessionConfig,
    SomaSessionConfig,
    WmsSessionConfig,
)

from ._base import BackendSession


def session_for(config: SessionConfig) -> BackendSession:
    """A new, not yet started, session for ``config``."""
    if isinstance(config, QcgSessionConfig):
        from .qcg import QcgSession

        return QcgSession(config)
    if isinstance(config, EcflowSessionConfig):
        from .ecflow import EcflowSession

        return EcflowSession(config)
    if isinstance(config, GuiserverSessionConfig):
        from .guiserver import GuiserverSession

        return GuiserverSession(config)
    if isinstance(config, SomaSessionConfig):
        from .soma import SomaSession

        return SomaSession(config)
    if isinstance(config, WmsSessionConfig):
        from .wms import WmsSession

        return WmsSession(config)
    raise ConfigError(f"session {getattr(config, 'name', '?')!r}: no adapter for {type(config).__name__}")

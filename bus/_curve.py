"""CurveZMQ: key files, the broker's authenticator, and client socket set-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from flowbus.schemas import ConfigError, CurveConfig


def make_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (public) and ``<name>.key_secret`` (secret, mode 0600)."""
    d = Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(d), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(Path(path).expanduser()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"bus.curve.{what}: cannot read key file {path!r}: {exc}") from None


class _ServerCurve:
    def __init__(self, ctx: zmq.Context[Any], cfg: CurveConfig) -> None:
        public, secret = _load(cfg.server_secret_key_file, "server-secret-key-file")
        if secret is None:
            raise ConfigError(f"bus.curve.server-secret-key-file: {cfg.server_secret_key_file!r} has no secret key")
        self.public_key, self.secret_key = public, secret
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        if cfg.authorized_keys_dir:
            d = Path(cfg.authorized_keys_dir).expanduser()
            if not d.is_dir():
                raise ConfigError(f"bus.curve.authorized-keys-dir: {str(d)!r} is not a directory")
            self.auth.configure_curve(domain="*", location=str(d))
        else:
            self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)

    def apply_server(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True

    def stop(self) -> None:
        self.auth.stop()


def server_setup(ctx: zmq.Context[Any], cfg: CurveConfig) -> _ServerCurve | None:
    """The broker's CURVE state, or None when no server secret key is configured."""
    return _ServerCurve(ctx, cfg) if cfg.server_secret_key_file else None


class ClientCurve:
    """What a client socket needs: the broker's public key and this client's key pair."""

    def __init__(self, server_public: bytes, public: bytes, secret: bytes) -> None:
        self.server_public, self.public, self.secret = server_public, public, secret

    @classmethod
    def from_config(cls, cfg: CurveConfig) -> ClientCurve | None:
        server_file = cfg.server_public_key_file or cfg.server_secret_key_file
        if not server_file:
            return None
        server_public, _ = _load(server_file, "server-public-key-file")
        if cfg.client_secret_key_file:
            public, secret = _load(cfg.client_secret_key_file, "client-secret-key-file")
            if secret is None:
                raise ConfigError(f"bus.curve.client-secret-key-file: {cfg.client_secret_key_file!r} has no secret key")
        else:
            public, secret = zmq.curve_keypair()  # an anonymous client: admitted only by ALLOW_ANY
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

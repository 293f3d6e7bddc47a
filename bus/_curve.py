"""CurveZMQ: key files, the broker's authenticator, and client socket set-up."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from flowbus.schemas import ConfigError, CurveConfig


def make_keypair(directory: str | Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``<name>.key`` (public, mode 0644) and ``<name>.key_secret`` (secret, mode 0600) in
    ``directory`` (created 0700 when missing). The files are made in a private temporary
    directory beside them and moved into place, so the secret is never readable by others.

    Raises ``ConfigError`` naming the file when either already exists (a key in use would be
    lost), unless ``force``; or when the directory cannot be written."""
    d = Path(directory).expanduser()
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    if not force:
        for path in (secret, public):
            if path.exists() or path.is_symlink():
                raise ConfigError(f"{path} already exists; not overwriting a key (use --force to replace it)")
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=d) as tmp:  # 0700
            made_public, made_secret = zmq.auth.create_certificates(tmp, name)
            os.chmod(made_secret, 0o600)
            os.chmod(made_public, 0o644)
            os.replace(made_secret, secret)
            os.replace(made_public, public)
    except OSError as exc:
        raise ConfigError(f"cannot write a key pair in {str(d)!r}: {exc.strerror or exc}") from None
    return public, secret


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(Path(path).expanduser()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"bus.curve.{what}: cannot read key file {path!r}: {exc}") from None


class _KeyDir:
    """The public keys in a directory of ``*.key`` files, read again when the directory changes
    (a colleague's key dropped in is admitted without a broker restart)."""

    def __init__(self, path: str, what: str) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ConfigError(f"bus.curve.{what}: {str(self.path)!r} is not a directory")
        self._mtime = -1.0
        self._keys: set[bytes] = set()

    def keys(self) -> set[bytes]:
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return set()
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                self._keys = set(zmq.auth.load_certificates(str(self.path)))
            except (OSError, ValueError):
                self._keys = set()
        return self._keys


class _Admission:
    """ZAP callback: owners (``authorized-keys-dir``) everywhere, readers only on read sockets."""

    def __init__(self, owners: _KeyDir | None, readers: _KeyDir | None) -> None:
        self.owners, self.readers = owners, readers

    def callback(self, domain: str, key: bytes) -> bool:
        if self.owners is None or key in self.owners.keys():  # noqa: SIM118 - a _KeyDir, no mapping
            return True
        return domain == READ_DOMAIN and self.readers is not None and key in self.readers.keys()  # noqa: SIM118 - a _KeyDir


#: ZAP domains of the broker's sockets: readers are admitted only where nothing is written
READ_DOMAIN = "read"
WRITE_DOMAIN = "write"


class _ServerCurve:
    def __init__(self, ctx: zmq.Context[Any], cfg: CurveConfig) -> None:
        public, secret = _load(cfg.server_secret_key_file, "server-secret-key-file")
        if secret is None:
            raise ConfigError(f"bus.curve.server-secret-key-file: {cfg.server_secret_key_file!r} has no secret key")
        self.public_key, self.secret_key = public, secret
        owners = _KeyDir(cfg.authorized_keys_dir, "authorized-keys-dir") if cfg.authorized_keys_dir else None
        readers = _KeyDir(cfg.readers_keys_dir, "readers-keys-dir") if cfg.readers_keys_dir else None
        if readers is not None and owners is None:
            raise ConfigError("bus.curve.readers-keys-dir: needs bus.curve.authorized-keys-dir too (otherwise "
                              "every client with the broker's public key may publish)")
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        if owners is None:
            self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            admission = _Admission(owners, readers)
            for domain in (READ_DOMAIN, WRITE_DOMAIN):
                self.auth.configure_curve_callback(domain=domain, credentials_provider=admission)

    def apply_server(self, sock: zmq.Socket[Any], domain: str = WRITE_DOMAIN) -> None:
        sock.zap_domain = domain.encode()
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

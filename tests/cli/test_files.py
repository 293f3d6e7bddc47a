"""Files flowbus leaves on disk: private where they hold secrets or addresses, and nothing left
behind in the shared temp space once a session, a run or a test stops."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowbus._runfile import state_dir, write_private
from flowbus.bus import make_keypair
from flowbus.schemas import ConfigError, FlowbusConfig, State, StateChanged
from support.qcg import (
    Running,
    qcg_fixture,  # noqa: F401 - provides the `qcg` fixture
    reached,
)

FLOWBUS = [sys.executable, "-m", "flowbus"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory standing in for the shared temp space (``tempfile`` makes its dirs here)."""
    tmp = tmp_path / "shared-tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


class TestStateDir:
    def test_created_private(self, tmp_path: Path) -> None:
        """state_path() creates the state directory (and missing parents) with mode 0700."""
        path = FlowbusConfig(state_dir=str(tmp_path / "a" / "state")).state_path()
        assert path == tmp_path / "a" / "state" and mode(path) == 0o700

    def test_existing_dir_tightened(self, tmp_path: Path) -> None:
        """An existing state directory of ours that others may enter is tightened to 0700."""
        path = tmp_path / "state"
        path.mkdir()
        path.chmod(0o755)
        assert FlowbusConfig(state_dir=str(path)).state_path() == path
        assert mode(path) == 0o700

    def test_not_a_directory(self, tmp_path: Path) -> None:
        """A file where the state directory should be is a ConfigError naming the path."""
        path = tmp_path / "state"
        path.write_text("")
        with pytest.raises(ConfigError, match=r"state-dir.*state"):
            FlowbusConfig(state_dir=str(path)).state_path()

    def test_runfile_state_dir_from_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The run file's state_dir() follows FLOWBUS_STATE_DIR and makes it 0700."""
        monkeypatch.setenv("FLOWBUS_STATE_DIR", str(tmp_path / "env-state"))
        assert state_dir() == tmp_path / "env-state"
        assert mode(tmp_path / "env-state") == 0o700


class TestWritePrivate:
    def test_new_file_is_0600_whatever_the_umask(self, tmp_path: Path) -> None:
        """write_private creates the file readable by the owner only, even under umask 0."""
        old = os.umask(0)
        try:
            write_private(tmp_path / "run.json", "{}")
        finally:
            os.umask(old)
        assert (tmp_path / "run.json").read_text() == "{}" and mode(tmp_path / "run.json") == 0o600

    def test_replaces_atomically(self, tmp_path: Path) -> None:
        """An existing file is replaced, not rewritten in place: a reader holding the old one
        still reads all of it, the new one is 0600, and no temporary file is left."""
        path = tmp_path / "run.json"
        path.write_text("old " * 1000)
        path.chmod(0o644)
        with path.open() as reader:
            write_private(path, "new")
            assert reader.read() == "old " * 1000
        assert path.read_text() == "new" and mode(path) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]

    def test_failure_keeps_old_content(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A write that fails half-way leaves the old file whole and no temporary file behind."""
        path = tmp_path / "run.json"
        path.write_text("old")

        def broken_fsync(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", broken_fsync)
        with pytest.raises(OSError, match="No space"):
            write_private(path, "new")
        assert path.read_text() == "old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def flowbus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(FLOWBUS + list(args), capture_output=True, text=True, timeout=60)


class TestKeys:
    @pytest.mark.timeout(90)
    def test_keys_refuses_to_overwrite_without_force(self, tmp_path: Path) -> None:
        """`flowbus keys` twice: the second refuses in one line naming the file and --force and
        changes nothing; with --force it writes a new pair. Secret 0600, new directory 0700."""
        keys = tmp_path / "new" / "keys"
        first = flowbus("keys", "--dir", str(keys), "--name", "broker")
        assert first.returncode == 0, first.stderr
        public, secret = keys / "broker.key", keys / "broker.key_secret"
        assert mode(keys) == 0o700 and mode(secret) == 0o600 and mode(public) == 0o644
        before = (public.read_bytes(), secret.read_bytes())

        again = flowbus("keys", "--dir", str(keys), "--name", "broker")
        assert again.returncode == 1
        message = again.stderr.strip()
        assert "\n" not in message, message
        assert str(secret) in message and "--force" in message, message
        assert (public.read_bytes(), secret.read_bytes()) == before

        forced = flowbus("keys", "--dir", str(keys), "--name", "broker", "--force")
        assert forced.returncode == 0, forced.stderr
        assert (public.read_bytes(), secret.read_bytes()) != before
        assert mode(secret) == 0o600 and mode(public) == 0o644
        assert sorted(p.name for p in keys.iterdir()) == ["broker.key", "broker.key_secret"]

    def test_existing_public_key_alone_is_kept(self, tmp_path: Path) -> None:
        """make_keypair refuses when only the public key file exists (it may be a colleague's)."""
        (tmp_path / "alice.key").write_text("someone's key")
        with pytest.raises(ConfigError, match=r"alice\.key already exists.*--force"):
            make_keypair(tmp_path, "alice")
        assert (tmp_path / "alice.key").read_text() == "someone's key"
        assert not (tmp_path / "alice.key_secret").exists()


class TestJournalFiles:
    @pytest.mark.timeout(60)
    def test_broker_journal_private(self, broker_factory: Any, tmp_path: Path) -> None:
        """A broker's journal directory is 0700 and its journal segment 0600."""
        broker_factory()
        journal = tmp_path / "journal0"
        assert mode(journal) == 0o700
        assert mode(journal / "journal.000001") == 0o600


@pytest.mark.qcg
@pytest.mark.timeout(90)
class TestQcgWorkingDir:
    """A QCG session without a configured ``wd`` works in a temporary directory that is gone
    once the manager working there is ended; a configured ``wd`` stays."""

    def test_stop_removes_temporary_wd(self, private_tmp: Path, qcg: Callable[..., Running]) -> None:
        """The temporary wd (with a job's output in it) is removed by stop()."""
        run = qcg(wd="")
        (wd,) = private_tmp.iterdir()
        assert wd.name.startswith("flowbus-qcg-q0-") and mode(wd) == 0o700
        run.call("submit", [{"name": "a", "exec": "/bin/echo", "args": ["hi"], "stdout": "a.out"}])
        run.rec.wait_for(reached("a", State.COMPLETE), 15, "a complete")
        run.session.stop()
        assert list(private_tmp.iterdir()) == []

    def test_kill_removes_temporary_wd(self, private_tmp: Path, qcg: Callable[..., Running]) -> None:
        """kill() ends the manager and removes the temporary wd too."""
        run = qcg(wd="", poll=False)
        run.session.kill()
        assert list(private_tmp.iterdir()) == []

    def test_configured_wd_stays(self, tmp_path: Path, qcg: Callable[..., Running]) -> None:
        """A configured wd is the user's: stop() leaves it (a restarted actor may need it)."""
        run = qcg(wd=str(tmp_path / "wd"))
        run.session.stop()
        assert (tmp_path / "wd").is_dir()

    def test_moved_session_successor_removes_adopted_wd(self, private_tmp: Path,
                                                        qcg: Callable[..., Running]) -> None:
        """release() leaves the manager's temporary wd to the next incarnation, which adopts the
        manager and removes that wd (and its own) when it stops and ends the manager."""
        first = qcg(wd="", name="moving")
        first.call("submit", [{"name": "long", "exec": "/bin/sleep", "args": ["30"]}])
        first.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        address = first.session.address
        first.stop.set()  # the host stops polling a fenced session before it releases it
        assert first.thread is not None
        first.thread.join(5)
        first.session.release()
        (wd,) = private_tmp.iterdir()
        assert (wd / ".flowbus" / "specs.json").is_file(), "release removed the manager's wd"
        known = {e.key: e for e in first.rec.of(StateChanged)}
        second = qcg(wd="", name="moving", known=known, previous_address=address)
        assert second.session.address == address
        assert len(list(private_tmp.iterdir())) == 2  # the adopted wd and the successor's own
        second.session.stop()
        assert list(private_tmp.iterdir()) == []

    def test_foreign_wd_not_inherited(self, private_tmp: Path, tmp_path: Path,
                                      qcg: Callable[..., Running]) -> None:
        """An adopted manager whose wd was configured (no temporary marker) keeps its wd."""
        first = qcg(wd=str(tmp_path / "conf"), name="moving")
        address = first.session.address
        first.stop.set()
        assert first.thread is not None
        first.thread.join(5)
        first.session.release()
        second = qcg(wd="", name="moving", previous_address=address)
        assert second.session.address == address
        second.session.stop()
        assert (tmp_path / "conf" / ".flowbus").is_dir()
        assert list(private_tmp.iterdir()) == []

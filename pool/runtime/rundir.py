"""The private run directory: where a pool's sockets, pid, authkey and spooled tasks live."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "POOL_RUN_DIR"
DEFAULT_DIR = ".pool"
AUTHKEY_BYTES = 32


def resolve_run_dir(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """``run_dir`` if given, else ``$POOL_RUN_DIR``, else ``./.pool`` (absolute)."""
    chosen = run_dir if run_dir is not None else os.environ.get(ENV_VAR) or DEFAULT_DIR
    return Path(chosen).expanduser().absolute()


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    path: Path

    @property
    def control_socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def state_socket(self) -> Path:
        return self.path / "state.sock"

    @property
    def state_versions(self) -> Path:
        return self.path / "state.ver"

    @property
    def authkey_file(self) -> Path:
        return self.path / "authkey"

    @property
    def pid_file(self) -> Path:
        return self.path / "supervisor.pid"

    @property
    def spool_file(self) -> Path:
        return self.path / "pending.tasks"

    @classmethod
    def at(cls, run_dir: str | os.PathLike[str] | None = None) -> RunDir:
        return cls(resolve_run_dir(run_dir))

    def create(self) -> None:
        """Create the directory with mode 0700 (tightening it if it already existed)."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.check_owner()
        os.chmod(self.path, 0o700)
        if len(str(self.control_socket)) > 100:
            raise ValueError(
                f"run directory path too long for a Unix socket ({self.path}); "
                "choose a shorter --run-dir"
            )

    @property
    def metrics_token_file(self) -> Path:
        return self.path / "metrics.token"

    def new_metrics_token(self) -> str:
        """A random bearer token for a metrics endpoint beyond loopback (file mode 0600)."""
        token = secrets.token_urlsafe(32)
        fd = os.open(self.metrics_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token)
        return token

    def new_authkey(self) -> bytes:
        """Write a fresh random authkey with mode 0600 and return it."""
        key = secrets.token_bytes(AUTHKEY_BYTES)
        tmp = self.authkey_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key)
        os.replace(tmp, self.authkey_file)
        return key

    def check_owner(self) -> None:
        """Refuse a directory another user owns: its owner could read the authkey or put
        a socket of their own in it (root included: root would otherwise accept any)."""
        owner = self.path.stat().st_uid
        if owner != os.geteuid():
            raise PermissionError(
                f"run directory {self.path} belongs to uid {owner}, not to this user "
                f"(uid {os.geteuid()}); use a directory of your own (--run-dir)"
            )

    def read_authkey(self) -> bytes:
        self.check_owner()
        return self.authkey_file.read_bytes()

    def running_pid(self) -> int | None:
        """The pid of a live supervisor using this directory, else ``None``."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def write_pid(self) -> None:
        self.pid_file.write_text(f"{os.getpid()}\n")

    def cleanup(self) -> None:
        """Remove what only a running pool needs; spooled tasks stay."""
        for path in (
            self.control_socket,
            self.state_socket,
            self.state_versions,
            self.pid_file,
            self.metrics_token_file,
            self.authkey_file,
        ):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

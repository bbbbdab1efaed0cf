"""A private PostgreSQL server for tests that stop and start the database.

The shared test cluster (``CONVCTL_TEST_DATABASE_URL``) must never be stopped: other tests use
it. ``PrivatePostgres`` runs a server of its own instead: ``initdb`` into a temporary folder,
``pg_ctl start`` on a free 127.0.0.1 port, trust authentication for the local user, no fsync
(the test owns the data and throws it away). PostgreSQL refuses to run as root, so as root the
binaries run as the ``postgres`` user (``runuser``) on a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from controller.testing import free_port

USER = "convctl"  # the database superuser initdb creates (trust authentication)


def postgres_bin() -> Path | None:
    """The folder of the newest installed ``initdb``/``pg_ctl``, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: [int(x) for x in Path(p).parent.parent.name.split(".") if x.isdigit()],
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


class PrivatePostgres:
    """One PostgreSQL server of this test: ``start``, ``stop``, ``start`` again, ``destroy``."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="convctl-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [*self._as, str(self.bin / tool), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({result.returncode}): {result.stderr[-2000:]}"
                + self.server_log()[-2000:]
            )

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> PrivatePostgres:
        if not self._initialised:
            self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "--no-sync")
            self._initialised = True
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: sessions are cut, as in an outage or a failover)."""
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-D", str(self.data), "-m", mode)

    def destroy(self) -> None:
        if self._initialised:
            subprocess.run(
                [
                    *self._as,
                    str(self.bin / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)

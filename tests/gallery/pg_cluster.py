"""A throwaway PostgreSQL cluster for the gallery tests: ``initdb`` + ``pg_ctl`` in a private
temporary folder, reachable only through a unix socket in that folder (no TCP at all), with
``trust`` authentication (safe: the folder and socket are the cluster owner's alone).

The server binaries are looked for in ``$FACEMETRIC_PG_BINDIR``, next to ``initdb`` on the
``PATH``, then in Debian's ``/usr/lib/postgresql/<version>/bin`` (newest first) and the PGDG
RPM's ``/usr/pgsql-<version>/bin``. ``initdb`` refuses to run as root, so as root the
cluster runs as the ``postgres`` user (Debian's package creates it), else as ``nobody``; the
folder is made theirs. Nothing here touches a system PostgreSQL service.

Durability is traded for speed (``fsync=off``): the tests kill clients, never the server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REQUIRE_ENV = "FACEMETRIC_REQUIRE_DATA"
BINDIR_ENV = "FACEMETRIC_PG_BINDIR"


class ClusterUnavailableError(RuntimeError):
    """No PostgreSQL server binaries (or no psycopg) on this machine."""


def _version_key(path: Path) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", path.parent.parent.name)
    return tuple(int(n) for n in numbers) or (0,)


def find_bindir() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``."""
    candidates: list[Path] = []
    if os.environ.get(BINDIR_ENV):
        candidates.append(Path(os.environ[BINDIR_ENV]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)  # Debian links into /usr/local/bin
    for pattern in ("/usr/lib/postgresql/*/bin/initdb", "/usr/pgsql-*/bin/initdb"):
        found = sorted((Path(p) for p in glob.glob(pattern)), key=_version_key, reverse=True)
        candidates += [p.parent for p in found]
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _free_port() -> int:
    # Only names the socket file (.s.PGSQL.<port>): the server listens on no TCP port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresCluster:
    """A running throwaway cluster (start with :meth:`start`, end with :meth:`stop`)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    self.owner = pwd.getpwnam(name)
                    break
            if self.owner is None:
                raise ClusterUnavailableError(
                    "running as root, and neither a 'postgres' nor a 'nobody' user exists to "
                    "run initdb as (it refuses root)"
                )
        # /tmp, not pytest's tmp_path: the cluster's owner must be able to reach the folder,
        # and pytest's base folder is private to the user running the tests.
        self.root = Path(tempfile.mkdtemp(prefix="fm-pg-", dir="/tmp" if self.owner else None))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._counter = 0
        self._icu: bool | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        if self.owner is not None:
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        os.chmod(self.root, 0o700)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self.owner is not None:
            kwargs.update(
                user=self.owner.pw_uid, group=self.owner.pw_gid, extra_groups=[]
            )
            env["HOME"] = str(self.root)
            env["USER"] = env["LOGNAME"] = self.owner.pw_name
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,  # type: ignore[arg-type]
        )

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no server log)"

    def start(self) -> None:
        done = self._run(
            "initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-3000:]}")
        options = (
            f"-k {self.root} -p {self.port} -c listen_addresses='' "
            "-c unix_socket_permissions=0700 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c shared_buffers=32MB -c max_connections=60"
        )
        done = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
            "-o", options, "start",
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"pg_ctl start failed ({done.returncode}): {done.stderr[-2000:]}\n"
                f"server log:\n{self._log_tail()}"
            )
        # If the test process dies without stop() (kill -9, a CI timeout), a watchdog in a
        # session of its own shuts the server down (SIGQUIT: immediate) and removes the folder.
        pidfile = self.data / "postmaster.pid"
        script = (
            f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; "
            f"[ -f '{pidfile}' ] && kill -QUIT \"$(head -n 1 '{pidfile}')\"; "
            f"sleep 3; rm -rf '{self.root}'"
        )
        self._watchdog = subprocess.Popen(
            ["sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
        try:
            done = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            if done.returncode != 0:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(host=str(self.root), port=self.port, user="postgres", dbname=dbname)

    def admin(self):  # -> psycopg.Connection
        import psycopg

        return psycopg.connect(self.dsn(), autocommit=True)

    def create_database(self, prefix: str = "t") -> str:
        """A fresh UTF8 database whose default collation is linguistic (ICU ``en-US``,
        where ``'a' < 'B'``), so code-point ordering must be asked for; returns its DSN."""
        self._counter += 1
        name = f"{prefix}{self._counter:04d}_{time.monotonic_ns() % 10**6}"
        with self.admin() as conn:
            if self._icu is None:
                try:
                    conn.execute(
                        f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\' '
                        f"LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
                    )
                    self._icu = True
                    return self.dsn(name)
                except Exception:  # PostgreSQL < 15 or built without ICU
                    self._icu = False
            if self._icu:
                conn.execute(
                    f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\' '
                    f"LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
                )
            else:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
        return self.dsn(name)


def psycopg_missing() -> bool:
    """Whether psycopg cannot be imported."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return True
    return False


def start_cluster() -> PostgresCluster:
    """Start a cluster; :class:`ClusterUnavailableError` when this machine has no PostgreSQL
    server binaries or no psycopg (the caller decides between skip and fail)."""
    try:
        import psycopg  # noqa: F401
    except ImportError as err:
        raise ClusterUnavailableError(
            "psycopg is not installed: pip install -e '.[postgres]' (make test does)"
        ) from err
    bindir = find_bindir()
    if bindir is None:
        raise ClusterUnavailableError(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH, in "
            f"${BINDIR_ENV} or /usr/lib/postgresql/*/bin; install them "
            "(apt-get install postgresql; make test does it when run as root)"
        )
    cluster = PostgresCluster(bindir)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster

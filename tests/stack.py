"""Real servers for tests: a private redis-server, Celery workers and the API.

Each helper starts a subprocess on a free loopback port, waits until it
responds, and stops it on exit. Process logs go to files. A context manager
that exits with an exception, or a fixture whose test failed, writes their
last lines to the terminal.

Test modules import the fixtures they use::

    from tests.stack import redis_service, store, worker_service  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from lrfinder.jobs import Job
from lrfinder.store import Store

REPOSITORY = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 80
PORT_ATTEMPTS = 5


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(
    condition: Callable[[], object],
    *,
    timeout_s: float,
    message: str,
    interval_s: float = 0.1,
) -> object:
    """Poll ``condition`` until it returns a true value; return that value.

    Raises:
        TimeoutError: ``condition`` stayed false for ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s: {message}")
        time.sleep(interval_s)


class Service:
    """A subprocess with its log file, stopped by its own process id only."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args,
                cwd=REPOSITORY,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signum)

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would."""
        self.send_signal(signal.SIGKILL)
        self.wait(timeout_s=10.0)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ask the process to exit (SIGTERM), then kill it after ``timeout_s``."""
        if not self.alive():
            return
        self.send_signal(signal.SIGTERM)
        if not self.wait(timeout_s=timeout_s):
            self.kill()

    def wait(self, timeout_s: float) -> bool:
        """Wait for the process to exit; return False if it still runs."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def dump_log(self) -> None:
        """Write the last lines of the log to the real terminal."""
        lines = self.log_text().splitlines()[-LOG_TAIL_LINES:]
        header = f"\n----- {self.name} log ({self.log_path}), last {len(lines)} lines -----\n"
        sys.__stderr__.write(header + "\n".join(lines) + "\n")
        sys.__stderr__.flush()

    def check_alive(self) -> bool:
        """Return True while running; raise with the log once the process died."""
        if self.alive():
            return True
        raise RuntimeError(f"{self.name} exited early:\n{self.log_text()[-4000:]}")


class RedisServer(Service):
    """A private redis-server on a free loopback port, data in its own folder.

    With ``appendonly`` every write reaches the append-only file before Redis
    replies (``appendfsync always``), so a restart loses nothing.
    """

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.appendonly = appendonly
        super().__init__(
            f"redis-{self.port}", self._arguments(), dict(os.environ), directory
        )

    def _arguments(self) -> list[str]:
        return [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--dir", str(self.directory),
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server, on a new port if another process took this one.

        A free port found by ``free_port`` may be taken by another process
        before redis-server binds it, so the server must also prove that it
        is this process (``INFO server`` names its process id).
        """
        for _ in range(PORT_ATTEMPTS - 1):
            try:
                self._start_once()
                return
            except PortTakenError:
                self.port = free_port()
                self.args = self._arguments()
        self._start_once()

    def _start_once(self) -> None:
        super().start()
        wait_until(self._is_running_here, timeout_s=20.0, message=f"{self.name} INFO")

    def restart(self) -> None:
        """Start the server again on the same port and folder after ``stop``.

        Raises:
            PortTakenError: another process took the port meanwhile.
        """
        self._start_once()

    def _is_running_here(self) -> bool:
        if not self.alive():
            if "Address already in use" in self.log_text():
                raise PortTakenError(self.port)
            self.check_alive()
        try:
            with socket.create_connection(
                ("127.0.0.1", self.port), timeout=1.0
            ) as conn:
                conn.sendall(b"INFO server\r\n")
                reply = conn.recv(65536).decode(errors="replace")
        except OSError:
            return False
        assert self.process is not None
        return f"process_id:{self.process.pid}\r\n" in reply


class PortTakenError(Exception):
    """Another process listens on the port a server was meant to use."""


def service_env(
    redis_url: str, data_root: Path | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Return the environment of a worker or API subprocess.

    LRFINDER_ variables of the calling shell are dropped so that every
    subprocess of a test gets the same, explicit configuration.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LRFINDER_")
    }
    env.update(
        LRFINDER_REDIS_URL=redis_url,
        LRFINDER_AUTH="none",
        LRFINDER_DECODE_WORKERS="1",
        LRFINDER_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    if data_root is not None:
        env["LRFINDER_DATA_ROOT"] = str(data_root)
    env.update(extra or {})
    return env


def _log_dir(log_dir: Path | None) -> Path:
    return log_dir or Path(tempfile.mkdtemp(prefix="lrfinder-stack-"))


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    """Start ``service``, stop it on exit, and show its log if the body raised."""
    try:
        service.start()
        yield service
    except BaseException:
        service.dump_log()
        raise
    finally:
        service.stop()


@contextlib.contextmanager
def redis_server(
    directory: Path | None = None, *, appendonly: bool = False
) -> Iterator[RedisServer]:
    """Run a private redis-server until the block ends."""
    server = RedisServer(_log_dir(directory), appendonly=appendonly)
    with running(server):
        yield server


CELERY = (sys.executable, "-m", "celery")


def worker_command(
    name: str, queue: str, launcher: tuple[str, ...] = CELERY
) -> list[str]:
    """Return the command of a worker; ``launcher`` replaces ``python -m celery``."""
    return [
        *launcher, "-A", "worker.app", "worker",
        "-Q", queue, "--pool", "solo", "--concurrency", "1",
        "--prefetch-multiplier", "1", "-n", f"{name}@%h",
        "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def start_worker(
    redis_url: str,
    env: dict[str, str] | None = None,
    *,
    name: str = "worker",
    queue: str = "lrfinder",
    log_dir: Path | None = None,
    launcher: tuple[str, ...] = CELERY,
) -> Service:
    """Start a Celery worker and wait until its presence key appears."""
    env = {**service_env(redis_url), **(env or {}), "LRFINDER_QUEUE": queue}
    command = worker_command(name, queue, launcher)
    worker = Service(f"worker-{name}", command, env, _log_dir(log_dir))
    worker.start()
    store = Store.from_url(redis_url)
    try:
        wait_until(
            lambda: worker.check_alive() and _worker_present(store, name),
            timeout_s=STARTUP_TIMEOUT_S,
            message=f"worker {name} registers in Redis",
        )
    except BaseException:
        worker.dump_log()
        worker.stop()
        raise
    finally:
        store.close()
    return worker


def _worker_present(store: Store, name: str) -> bool:
    return any(record["name"].startswith(f"{name}@") for record in store.live_workers())


@contextlib.contextmanager
def worker_process(
    redis_url: str,
    env: dict[str, str] | None = None,
    *,
    name: str = "worker",
    queue: str = "lrfinder",
    log_dir: Path | None = None,
    launcher: tuple[str, ...] = CELERY,
) -> Iterator[Service]:
    """Run a Celery worker (solo pool) until the block ends."""
    worker = start_worker(
        redis_url, env, name=name, queue=queue, log_dir=log_dir, launcher=launcher
    )
    try:
        yield worker
    except BaseException:
        worker.dump_log()
        raise
    finally:
        worker.stop()


class ApiServer(Service):
    """The API under uvicorn on a free loopback port."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.port = free_port()
        super().__init__(f"api-{self.port}", self._arguments(), env, log_dir)

    def _arguments(self) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "api.main:app",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start uvicorn, on a new port if another process took this one."""
        for _ in range(PORT_ATTEMPTS - 1):
            try:
                self._start_once()
                return
            except PortTakenError:
                self.port = free_port()
                self.args = self._arguments()
        self._start_once()

    def _start_once(self) -> None:
        super().start()
        wait_until(
            self._healthy, timeout_s=STARTUP_TIMEOUT_S, message=f"{self.name} /healthz"
        )

    def _healthy(self) -> bool:
        if not self.alive() and "address already in use" in self.log_text().lower():
            raise PortTakenError(self.port)
        self.check_alive()
        # Only ask once this process listens, so that another server that
        # took the port first is never mistaken for this one.
        if not _listens_on(self.process, self.port):
            return False
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


def _listens_on(process: subprocess.Popen[bytes] | None, port: int) -> bool:
    if process is None:
        return False
    try:
        connections = psutil.Process(process.pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(
        conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
        for conn in connections
    )


@contextlib.contextmanager
def api_process(
    redis_url: str,
    env: dict[str, str] | None = None,
    *,
    log_dir: Path | None = None,
) -> Iterator[ApiServer]:
    """Run the API until the block ends; ``.base_url`` is its address."""
    server = ApiServer({**service_env(redis_url), **(env or {})}, _log_dir(log_dir))
    with running(server):
        yield server


def send_job(redis_url: str, job_id: str, queue: str = "lrfinder") -> None:
    """Put one ``lrfinder.run_job`` message for ``job_id`` on ``queue``."""
    from celery import Celery

    producer = Celery("lrfinder-tests", broker=redis_url)
    producer.conf.broker_connection_retry_on_startup = True
    try:
        producer.send_task("lrfinder.run_job", args=[job_id], queue=queue)
    finally:
        producer.close()


def wait_for_job(
    store: Store,
    job_id: str,
    condition: Callable[[Job], bool],
    *,
    timeout_s: float = 120.0,
    services: tuple[Service, ...] = (),
) -> Job:
    """Poll the job until ``condition`` holds; fail early if a service died."""

    def check() -> Job | None:
        for service in services:
            service.check_alive()
        job = store.get_job(job_id)
        return job if job is not None and condition(job) else None

    return wait_until(
        check, timeout_s=timeout_s, message=f"job {job_id}", interval_s=0.2
    )  # type: ignore[return-value]


def is_final(job: Job) -> bool:
    return job.status in ("succeeded", "failed", "cancelled")


# Fixtures. Services are shared by the tests of one module, because a worker
# takes seconds to start; each test's failure shows the logs.


@pytest.fixture(scope="module")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for the tests of one module."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def store(redis_service: RedisServer) -> Iterator[Store]:
    """A store on the module's private Redis, emptied before each test."""
    client_store = Store.from_url(redis_service.url)
    client_store.client.flushdb()
    yield client_store
    client_store.close()


@pytest.fixture(scope="module")
def worker_service(
    redis_service: RedisServer,
    data_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """A real Celery worker consuming the module's Redis, on the CPU."""
    env = service_env(redis_service.url, data_root)
    with worker_process(
        redis_service.url, env, log_dir=tmp_path_factory.mktemp("worker")
    ) as worker:
        yield worker


@pytest.fixture(scope="module")
def api_service(
    redis_service: RedisServer,
    data_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApiServer]:
    """The API process on the module's Redis, authentication off."""
    env = service_env(redis_service.url, data_root)
    with api_process(
        redis_service.url, env, log_dir=tmp_path_factory.mktemp("api")
    ) as api:
        yield api


@pytest.fixture
def show_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[list[Service]]:
    """Collects services whose logs are shown when the test fails.

    Tests append the services they use. The check compares the session's
    failure count before and after the test, because pytest counts a
    failed test before this fixture's teardown runs.
    """
    services: list[Service] = []
    failures_before = request.session.testsfailed
    yield services
    if request.session.testsfailed > failures_before:
        for service in services:
            service.dump_log()

"""`diffgap-serve --workers N`: N server processes on one listening socket, over one index.

Each worker is a whole service (its own state, micro-batcher, and thread pools sized to its share of
the CPUs). The vectors are memory-mapped read-only (`vectors.npy`), so the workers share one copy
through the page cache instead of holding one each (BENCHMARKS.md shows RSS and PSS).

uvicorn's supervisor answers SIGHUP by replacing its workers, and a new worker would take connections
while its index is still loading. Here SIGHUP is forwarded instead: every worker swaps its state in
place, exactly as a single process does, and no request is dropped. An admin reload lands on one
worker; that worker reloads, then asks the supervisor (SIGUSR1) to pass SIGHUP on to every worker, so
the others follow within moments (the asking one reloads a second time; an unchanged refiner is reused, ~35 ms).

/metrics adds up every worker's counters: prometheus_client's multiprocess mode, with a directory of
per-process files made for this run (or the operator's PROMETHEUS_MULTIPROC_DIR, emptied first).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from prometheus_client import multiprocess
from uvicorn import Config
from uvicorn.supervisors.multiprocess import Multiprocess

from service.settings import Settings

log = logging.getLogger("diffgap.serve")
WORKER_ENV = "DIFFGAP_WORKER_CONFIG"  # the supervisor's settings, as JSON, for the workers it spawns
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it


def metrics_are_shared() -> bool:
    """True in a worker of several: /metrics must gather every process's files."""
    return bool(os.environ.get(METRICS_DIR_ENV))


def ask_siblings_to_reload() -> None:
    """From a worker: have the supervisor pass a reload on to every worker."""
    os.kill(os.getppid(), signal.SIGUSR1)


def worker_settings() -> tuple[Settings, str]:
    """In a spawned worker: the supervisor's settings (as given, not read from the environment again)
    and log level. The SIGHUP a reload forwards is ignored until the app's lifespan handles it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = json.loads(os.environ[WORKER_ENV])
    return Settings.model_validate(config["settings"]), config["log_level"]


def worker_socket(host: str, port: int) -> socket.socket:
    """A socket bound to the port its siblings share (SO_REUSEPORT): the kernel spreads new connections
    over those that listen, by address hash. It is bound, not listening: the worker's uvicorn listens
    once the worker's lifespan has loaded the index, so a worker that is still loading (at start, or
    replacing a dead one) is handed no connection.

    The protocol is named (IPPROTO_TCP, not 0): asyncio turns Nagle's algorithm off only on sockets
    whose `proto` says TCP, and with it on, a response written in two pieces waits for the client's
    delayed ACK: every keep-alive request took 44 ms more (measured, /healthz 4.9 -> 44 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Supervisor(Multiprocess):
    """uvicorn's supervisor (spawns, watches and replaces workers), with a listening socket of its own
    for each worker, reloads passed on rather than answered by restarting, and the metrics files of
    dead workers retired.

    Why a socket each: on one shared socket, whichever worker wakes first accepts a whole burst of
    connections (measured: all 8 of a load generator's connections on one worker, the other idle).
    With SO_REUSEPORT the kernel hashes each connection to one listening worker's socket. The supervisor
    keeps no copy: a socket nobody accepts on would still be handed connections, which would then hang.
    """

    def __init__(self, config: Config, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._handed_out: list[socket.socket] = []
        super().__init__(config, sockets=[])

    @property
    def sockets(self) -> list[socket.socket]:
        # uvicorn reads this once for each worker it spawns (at start, on replacing a dead one)
        sock = worker_socket(self.host, self.port)
        self._handed_out.append(sock)
        return [sock]

    @sockets.setter
    def sockets(self, _: list[socket.socket]) -> None:
        pass  # each worker gets its own (above)

    def _close_handed_out(self) -> None:
        """The started workers hold their sockets (passed at spawn); the supervisor lets go of its copies."""
        while self._handed_out:
            self._handed_out.pop().close()

    def init_processes(self) -> None:
        super().init_processes()
        self._close_handed_out()

    def handle_ttin(self) -> None:
        super().handle_ttin()
        self._close_handed_out()

    def handle_hup(self) -> None:
        log.info("SIGHUP: every worker reloads the index")
        self._forward(signal.SIGHUP)

    def handle_usr1(self) -> None:
        log.info("a worker reloaded the index: every worker follows")
        self._forward(signal.SIGHUP)

    def _forward(self, sig: signal.Signals) -> None:
        for process in self.processes:
            if process.pid is not None and process.process.is_alive():
                os.kill(process.pid, sig)

    def keep_subprocess_alive(self) -> None:
        before = {p.pid for p in self.processes}
        super().keep_subprocess_alive()
        self._close_handed_out()
        if metrics_are_shared():
            for pid in before - {p.pid for p in self.processes}:
                if pid is not None:
                    multiprocess.mark_process_dead(pid)


def run_workers(settings: Settings, log_level: str, timeout_graceful_shutdown: float) -> None:
    """Serve with `settings.workers` processes until SIGINT/SIGTERM."""
    assert settings.workers > 1, "one worker is served in process by uvicorn.run"
    own_dir = not os.environ.get(METRICS_DIR_ENV)
    metrics_dir = Path(tempfile.mkdtemp(prefix="diffgap-metrics-") if own_dir else os.environ[METRICS_DIR_ENV])
    for stale in metrics_dir.glob("*.db"):  # a previous run's counters would be added to this one's
        stale.unlink()
    os.environ[METRICS_DIR_ENV] = str(metrics_dir)
    os.environ[WORKER_ENV] = json.dumps({"settings": settings.model_dump(mode="json"), "log_level": log_level})
    config = Config(
        "service.app:worker_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=log_level,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
        http="service.server:HeaderDeadlineH11",
        limit_concurrency=settings.limit_concurrency,
    )
    config.bind_socket().close()  # the port is free (uvicorn says so and exits if not), before any worker starts
    try:
        Supervisor(config, settings.host, settings.port).run()
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)

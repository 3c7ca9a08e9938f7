"""A throwaway real RabbitMQ node, for checking the mock broker against the real one.

:class:`RabbitMQNode` starts Debian's ``rabbitmq-server`` in a temporary folder, on
free loopback ports, and removes every trace of it on exit. It exists so that the
same broker-facing tests can run against :class:`~lvmopstools.testing.MockBroker`
and against RabbitMQ itself in one test session.

It is not a way to run RabbitMQ in production, and it does not manage clusters,
plugins, TLS or users other than the default ``guest``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

__all__ = ["RabbitMQNode", "RabbitMQStartError", "find_rabbitmq_server"]

log = logging.getLogger(__name__)

# The Debian package's /usr/sbin/rabbitmq-server switches to the rabbitmq user,
# who cannot write a root-owned temporary folder; the script below it runs the
# node as whoever calls it.
SERVER_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server",)

INSTALL_HINT = (
    "rabbitmq-server is not installed; install it with "
    "'apt-get install -y rabbitmq-server' (Debian) to run the real-RabbitMQ half"
)


def find_rabbitmq_server() -> Path | None:
    """Return the path of a ``rabbitmq-server`` start script, or None.

    Returns
    -------
    path
        The script that starts a node as the calling user, or None when
        RabbitMQ is not installed.
    """
    for candidate in SERVER_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)

    return None


class RabbitMQStartError(RuntimeError):
    """The RabbitMQ node did not come up; the message carries its log tail."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class RabbitMQNode:
    """A RabbitMQ node in a temporary folder on free loopback ports.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with RabbitMQNode() as node:
            connection = await aio_pika.connect(node.url)

    Start-up takes about ten seconds on the project's machines.

    Parameters
    ----------
    server
        Path of the ``rabbitmq-server`` start script. Defaults to what
        :func:`find_rabbitmq_server` finds.
    startup_timeout
        Real seconds to wait for the node to accept AMQP connections.

    Raises
    ------
    FileNotFoundError
        If no ``rabbitmq-server`` script is found; the message says how to
        install one.

    .. note::
        The node listens on 127.0.0.1 only, with the default ``guest`` user,
        and its Erlang port mapper runs on a private port and is stopped with
        the node. Stopping signals only the process group this object started.
    """

    def __init__(
        self,
        server: str | Path | None = None,
        *,
        startup_timeout: float = 60.0,
    ) -> None:
        found = Path(server) if server is not None else find_rabbitmq_server()
        if found is None or not os.access(found, os.X_OK):
            shown = str(server) if server is not None else "rabbitmq-server"
            msg = f"cannot run {shown!r}: {INSTALL_HINT}"
            raise FileNotFoundError(msg)

        if startup_timeout <= 0:
            msg = f"startup_timeout must be positive, got {startup_timeout!r}"
            raise ValueError(msg)

        self.server = found
        self.startup_timeout = startup_timeout
        self.port = 0
        self._epmd_port = 0
        self._folder: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``amqp://`` URL, with the default credentials, of the running node."""
        if self._process is None:
            msg = "the RabbitMQ node is not running; call start() first"
            raise RuntimeError(msg)

        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _environment(self, folder: Path) -> dict[str, str]:
        plugins_file = folder / "enabled_plugins"
        plugins_file.write_text("[].\n")
        node = f"lvm{uuid.uuid4().hex[:8]}@localhost"

        env = dict(os.environ)
        env.update(
            HOME=str(folder),
            RABBITMQ_NODENAME=node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(_free_port()),
            RABBITMQ_MNESIA_BASE=str(folder / "mnesia"),
            RABBITMQ_LOG_BASE=str(folder / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins_file),
            RABBITMQ_CONFIG_FILE=str(folder / "rabbitmq"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self._epmd_port),
        )
        return env

    def _log_tail(self, lines: int = 30) -> str:
        if self._folder is None:
            return ""

        tail: list[str] = []
        for path in sorted((self._folder / "log").glob("*.log")):
            with contextlib.suppress(OSError):
                tail.extend(path.read_text(errors="replace").splitlines()[-lines:])

        return "\n".join(tail[-lines:])

    def start(self) -> RabbitMQNode:
        """Start the node and wait until it accepts connections.

        Returns
        -------
        node
            This node, started.

        Raises
        ------
        RabbitMQStartError
            If the node exits or does not listen within ``startup_timeout``; the
            node is stopped and its folder removed before this is raised.
        """
        if self._process is not None:
            msg = "this RabbitMQ node is already running"
            raise RuntimeError(msg)

        self._folder = Path(tempfile.mkdtemp(prefix="lvm-rabbitmq-"))
        self.port = _free_port()
        self._epmd_port = _free_port()
        env = self._environment(self._folder)

        log.info("starting RabbitMQ on port %d", self.port)
        self._process = subprocess.Popen(
            [str(self.server)],
            env=env,
            cwd=self._folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

        return self

    def _wait_until_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout

        # Polling is the only readiness signal a foreign process gives us here;
        # each probe is one loopback connect, bounded by the deadline.
        while not _port_open(self.port):
            if self._process.poll() is not None:
                msg = (
                    f"RabbitMQ exited with status {self._process.returncode} "
                    f"before listening; log tail:\n{self._log_tail()}"
                )
                raise RabbitMQStartError(msg)

            if time.monotonic() > deadline:
                msg = (
                    f"RabbitMQ did not listen on port {self.port} within "
                    f"{self.startup_timeout} s; log tail:\n{self._log_tail()}"
                )
                raise RabbitMQStartError(msg)

            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the node, its port mapper, and remove its folder.

        Stopping a node that is not running does nothing.
        """
        process, self._process = self._process, None
        if process is not None:
            log.info("stopping RabbitMQ on port %d", self.port)
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)

            self._stop_epmd()

        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            log.debug("RabbitMQ process group %d already gone", process.pid)

    def _stop_epmd(self) -> None:
        # erl starts a daemonised port mapper that leaves our process group; it
        # runs on a private port, so asking that port to exit touches no other.
        epmd = shutil.which("epmd")
        if epmd is None or not self._epmd_port:
            return

        env = dict(os.environ, ERL_EPMD_PORT=str(self._epmd_port))
        try:
            subprocess.run(
                [epmd, "-kill"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("could not stop epmd on port %d: %r", self._epmd_port, exc)

    def __enter__(self) -> RabbitMQNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

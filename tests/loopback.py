"""Flower's deployment processes on 127.0.0.1 for the tests (``test_federated``, ``test_faults``):
a SuperLink with TLS and SuperNode authentication, SuperNodes with their own keys and node
config, ``flwr run`` of this repository, and the tiny run config they train.

Every process is started here and stopped here by PID, with its descendants: the SuperLink and
each SuperNode start a ``flower-superexec`` child in its own session, which starts the ServerApp
and ClientApp processes. Nothing is looked up or killed by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fedgin.config import RunConfig, SiteSpec, resolve

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: the smallest run that still trains, validates and aggregates
TINY = {"steps_per_epoch": 2, "batch_size": 2, "num_threads": 1, "validate": True}


def tiny_config(out: Path, sites: dict[str, Path | str], **overrides) -> RunConfig:
    return resolve("quick", command="test", out=str(out), sites=tuple(SiteSpec(n, str(p)) for n, p in sites.items()),
                   train_overrides=TINY, **{"rounds": 2, "local_epochs": 1, **overrides})


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the parenthesised command name (state is [0], the
    parent id [1], the start time [19]); None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields is None:
                continue
            try:
                tree.setdefault(int(fields[1]), []).append(int(entry.name))
            except (IndexError, ValueError):
                continue
    return tree


def with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and all their descendants, parents before children."""
    tree, found, todo = children(), [], list(reversed(pids))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(reversed(tree.get(pid, [])))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of this process counts as gone
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a process from a later one that reuses its PID)."""
    fields = _stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def stop(procs: list[subprocess.Popen]) -> list[int]:
    """Stop every process started here and all their descendants, by PID (SuperExec children run
    in their own session, so the tree is collected before anything is killed); returns the PIDs."""
    pids = with_descendants([p.pid for p in procs if p.poll() is None])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            for p in procs:
                p.poll()
            time.sleep(0.1)
    for p in procs:
        p.wait(timeout=10)
    return pids


def crash(proc: subprocess.Popen) -> list[int]:
    """Kill ``proc`` and every descendant with SIGKILL, as a host's crash would: no process of the
    tree gets to clean up or say goodbye. The tree is frozen (SIGSTOP) first, so nothing in it
    starts a new process between collecting it and killing it. Returns the PIDs killed."""
    frozen: list[int] = []
    while True:
        tree = [pid for pid in with_descendants([proc.pid]) if pid not in frozen and alive(pid)]
        if not tree:
            break
        for pid in tree:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen.extend(tree)
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in frozen):
        time.sleep(0.1)
    return frozen


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


class Loopback:
    """Flower's processes on 127.0.0.1, started by this test and stopped by PID."""

    def __init__(self, root: Path):
        from fedgin.federated.certs import write_node_key, write_tls_files

        self.root = root
        self.certs = write_tls_files(root / "certs", ("127.0.0.1", "localhost"))
        self.keys = {name: write_node_key(root / "certs", name) for name in ("ct", "mri", "stranger")}
        self.procs: list[subprocess.Popen] = []
        #: every PID seen in the trees of ``procs`` (with its start time), for :meth:`stop_all`
        self.seen: dict[int, str] = {}
        self.logs = root / "logs"
        self.logs.mkdir()
        self.port, *self.node_ports = free_ports(5)
        self.env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_HOME=str(root / "flwr-cli"),
                        OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")

    def start(self, name: str, args: list[str], **env) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **env},
                                cwd=self.root)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start_superlink(self, *args: str, name: str = "superlink") -> subprocess.Popen:
        """Start a SuperLink (log ``name``), wait for its health endpoint and point the ``flwr``
        CLI's connection ``loopback`` at it; ``args`` are extra flags (``--database PATH``)."""
        proc = self.start(name, [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs["ca"]),
            "--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port), *args,
        ], FLWR_HOME=str(self.root / "superlink"))
        context = ssl.create_default_context(cafile=str(self.certs["ca"]))
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", context=context, timeout=2)
                break
            except OSError:
                assert proc.poll() is None, self.log(name)
                assert time.monotonic() < deadline, "SuperLink not up in 60 s:\n" + self.log(name)
                time.sleep(0.2)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca"]}"\n')
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=self.root)

    def register(self, *names: str) -> None:
        """Register the SuperNode keys ``names`` with the SuperLink."""
        for name in names:
            done = self.flwr("supernode", "register", str(self.keys[name][1]), "loopback")
            assert done.returncode == 0 and "registered" in done.stdout, done.stdout + done.stderr

    def supernode(self, name: str, port: int, *args: str, log: str | None = None) -> subprocess.Popen:
        return self.start(log or f"supernode-{name}", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(port), *args,
        ], FLWR_HOME=str(self.root / "nodes" / name))

    def site(self, index: int, name: str, data: Path, modality: str, *, log: str | None = None) -> subprocess.Popen:
        """A SuperNode for site ``name`` (its registered key, its data in its node config), connected."""
        node_config = f"data-dir='{data}' modality='{modality}' site-name='{name}'"
        proc = self.supernode(name, self.node_ports[index], "--root-certificates", str(self.certs["ca"]),
                              "--auth-supernode-private-key", str(self.keys[name][0]),
                              "--node-config", node_config, log=log)
        self.wait_connected(name, proc, log=log)
        return proc

    def wait_connected(self, name: str, proc: subprocess.Popen, timeout: float = 90, *,
                       log: str | None = None) -> None:
        log = log or f"supernode-{name}"
        deadline = time.monotonic() + timeout
        while "SuperNode ID" not in self.log(log):
            assert proc.poll() is None, self.log(log)
            assert time.monotonic() < deadline, f"SuperNode {name} not connected:\n" + self.log(log)
            time.sleep(0.2)

    def run(self, config_file: Path, name: str = "flwr-run") -> subprocess.Popen:
        """``flwr run`` of this repository with a fedgin ``config.json``, its log streamed to ``name``."""
        return self.start(name, [str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream",
                                 "--run-config", f"config-file='{config_file}'"])

    def note_tree(self) -> None:
        """Remember every process now in the trees of the processes started here (a process whose
        parent dies is re-parented and would otherwise be lost to :meth:`stop_all`)."""
        for pid in with_descendants([p.pid for p in self.procs if p.poll() is None]):
            started = start_time(pid)
            if started is not None:
                self.seen.setdefault(pid, started)

    def stop_all(self) -> list[int]:
        """:func:`stop` of everything started here, plus any process once seen in their trees that
        outlived its parent (same PID and start time, so never a stranger that reuses the PID)."""
        self.note_tree()
        stopped = stop(self.procs)
        strays = [pid for pid, started in self.seen.items() if pid not in stopped and start_time(pid) == started]
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(pid) for pid in strays):
            time.sleep(0.1)
        return stopped + strays


def metrics_lines(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    # a line being appended right now has no newline yet: only whole lines count
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]

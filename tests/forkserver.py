"""A fork server for the tests' CLI runs: one process imports torch, transformers, peft, deepspeed and llmtune
once, and every `run_cli` (one process, no special arguments) is a fork of it that runs `python -m llmtune
ARGS` as a fresh interpreter would (`runpy`, its own cwd, environment and standard streams, atexit handlers
at the end). A CLI run then costs its own work instead of ~7 s of CPU for the imports.

Faithful where it matters: the run is a real process (its own pid, killable, signals and exit codes as a
fresh one's); nothing has run in the server before it forks (imports only: no model, no process group, no
DeepSpeed engine); hash randomisation is fixed for every CLI run, forked or not (tests/conftest.py sets
PYTHONHASHSEED). Where a fork could differ from a fresh process, the caller runs a real subprocess instead:
an environment that differs from the server's in anything but LLMTUNE_* variables (library settings such as
HF_HOME are read at import), more than one process (torchrun), or any subprocess argument.
LLMTUNE_TEST_FORK=0 turns the server off.

Protocol (a Unix socket): the client sends one JSON request {args, cwd, env} with three file descriptors
(stdin, stdout, stderr); the server forks a waiter, which forks the run, sends back {"pid": N}, waits for it
and sends {"status": S} (the raw wait status), then exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- the server


def _preload() -> None:
    """Import what every CLI run imports (nothing is run: no model, no process group)."""
    import torch

    if not torch.cuda.is_available():  # as llmtune's distributed set-up does before DeepSpeed comes in
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import llmtune.cli
    import llmtune.engine.trainer
    import llmtune.stages  # noqa: F401
    from llmtune.engine import import_deepspeed

    import_deepspeed()


def _run_child(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked run: become `python -m llmtune ARGS` in the requested cwd, environment and streams."""
    import atexit
    import runpy

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets it at start-up
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["llmtune", *request["args"]]
    code: Any = 0
    try:
        runpy.run_module("llmtune", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _serve_one(conn: socket.socket, listener: socket.socket) -> None:
    """In the waiter (a fork of the server): fork the run, report its pid, wait, report its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    request = json.loads(data.decode())
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn.close()
        _run_child(request, fds)
    for fd in fds:
        os.close(fd)
    _send(conn, {"pid": pid})
    _, status = os.waitpid(pid, 0)
    _send(conn, {"status": status})
    conn.close()
    os._exit(0)


def _die_with_parent() -> None:
    """The server ends when the test process does, however it ends (Linux: PR_SET_PDEATHSIG)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def serve(path: str, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the test process ended before the line above
        return
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the test process ends the server (or its sweep does)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print(json.dumps({"ready": dict(os.environ)}), flush=True)  # as the imports left it (DS_ACCELERATOR)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            _serve_one(conn, listener)
        conn.close()


# ----------------------------------------------------------------------------------------------- the client


class ForkServer:
    # variables the CLI reads only at run time (and pytest's own): another value does not stop a fork from
    # standing in for a fresh process (every other variable is compared with the server's)
    RUNTIME_PREFIXES = ("LLMTUNE_", "PYTEST_", "MLFLOW_", "_MLFLOW_", "WANDB_")

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmtune-forkserver-")
        self.path = os.path.join(self.dir, "socket")
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.imported: set[str] = set()

    def start(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", self.path, str(os.getpid())],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # the libraries' import-time notes: each fresh CLI run prints its own
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            after = json.loads(line)["ready"]
            # what the imports set (DS_ACCELERATOR, TORCHINDUCTOR_CACHE_DIR, ...): a fresh process sets it too
            self.imported = {k for k in after if after[k] != self.env.get(k)}
            self.env = after
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"the test fork server did not start (exit {self.proc.poll()})") from None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def can_run(self, env: dict[str, str]) -> bool:
        keys = (set(env) | set(self.env)) - {k for k in self.imported if k not in env}
        differ = {k for k in keys if not k.startswith(self.RUNTIME_PREFIXES) and env.get(k) != self.env.get(k)}
        STATS["differ"].update(differ)
        return not differ

    def run(self, cmd: list[str], args: list[str], cwd: Path, env: dict[str, str], timeout: float):
        """As subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, open(os.devnull, "rb") as null:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(self.path)
            request = json.dumps({"args": args, "cwd": str(cwd), "env": env}).encode()
            socket.send_fds(conn, [request], [null.fileno(), out.fileno(), err.fileno()])
            reader = conn.makefile("r")
            deadline = time.monotonic() + timeout
            pid = json.loads(reader.readline())["pid"]
            try:
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                line = reader.readline()
            except TimeoutError:
                line = ""
            finally:
                if not line:  # a time-out (or the waiter died): end the run as subprocess.run would
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                conn.close()
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode("utf-8", errors="replace")
            stderr = err.read().decode("utf-8", errors="replace")
        if not line:
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
        status = json.loads(line)["status"]
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return subprocess.CompletedProcess(cmd, code, stdout, stderr)


_SERVER: ForkServer | None = None
STATS: dict[str, Any] = {"forked": 0, "fresh": 0, "differ": set()}  # for the summary at the end of the session


def server(env: dict[str, str]) -> ForkServer | None:
    """The session's fork server (started on first use), or None where forking is off or not possible."""
    global _SERVER
    if os.environ.get("LLMTUNE_TEST_FORK", "1") == "0" or sys.platform != "linux" or not hasattr(socket, "send_fds"):
        return None
    if _SERVER is None:
        _SERVER = ForkServer()
        try:
            _SERVER.start(env)
        except Exception:
            _SERVER.stop()
            os.environ["LLMTUNE_TEST_FORK"] = "0"
            _SERVER = None
            return None
    elif _SERVER.pid is None:  # it died (killed by hand): start again
        _SERVER.start(env)
    return _SERVER


def stop() -> None:
    global _SERVER
    if _SERVER is not None:
        _SERVER.stop()
        _SERVER = None


def server_pid() -> int | None:
    return _SERVER.pid if _SERVER is not None else None


if __name__ == "__main__":
    sys.path[0] = str(ROOT)
    serve(sys.argv[1], int(sys.argv[2]))

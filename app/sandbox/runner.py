"""The warm runner: one long-lived process per local sandbox.

The local backend starts this file as `python3 runner.py LISTEN_FD LIFETIME`
inside the sandbox (under bubblewrap when it is installed), so the namespace
setup and the interpreter start are paid once per sandbox instead of once per
execution. It accepts requests on an inherited, already listening Unix
socket whose path only the host can see. Each execution is two forks:

- a supervisor, a child subreaper, so every descendant of the execution
  (even one that calls `setsid`) stays below it and is killed when the
  execution ends or times out;
- the program, which calls `setsid`, takes its env, cwd, rlimits and the
  stdout/stderr pipes that the host passed over the socket, and then either
  runs Python code in the forked interpreter (as `python3 -c` would) or execs
  the command (node, bash, installers).

The runner exits when its lifetime ends without a keep-alive, which ends the
sandbox. A spare runner (`python3 runner.py LISTEN_FD LIFETIME TIE_FD`) also
exits when the read end TIE_FD of its worker's pipe reaches end of file, which
happens when the worker dies, until a request with `claim` makes it a
sandbox. It must run on the host's `python3` (3.9 or later) with the standard
library only: nothing of the application is visible inside the sandbox.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import ctypes
import importlib
import json
import os
import resource
import select
import signal
import site
import socket
import struct
import sys
import time
import types

# Among the imports above, atexit, builtins, importlib (which imports
# warnings), resource, site and types are used by the forked program. They
# are imported here, once, because each execution would otherwise load them
# from disk again.

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_HEADER = struct.Struct("!I")
# Seconds the runner waits for a warm supervisor to take a request.
_ACK_TIMEOUT = 2.0
# Seconds a warm supervisor waits for its program's reply to a probe, within
# the runner's wait for the supervisor.
_PROBE_TIMEOUT = 1.0
_LIBC = ctypes.CDLL(None, use_errno=True)
# The read end of the spare's pipe to its worker, or None once claimed (or for
# a sandbox started as itself). Forked supervisors and programs close it.
_tie: int | None = None
# sys.path as `python3 -c` starts it, without the script's folder first.
_BASE_PATH = [entry for entry in sys.path[1:]]


def _prctl(option: int, value: int) -> None:
    _LIBC.prctl(option, value, 0, 0, 0)


def read_body(conn: socket.socket) -> tuple[bytes, list[int]]:
    """Read one length-prefixed message body and the fds sent with it."""
    data, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 4)
    fds = list(fds)
    while len(data) < _HEADER.size:
        more = conn.recv(_HEADER.size - len(data))
        if not more:
            raise EOFError("connection closed inside a message header")
        data += more
    (length,) = _HEADER.unpack(data)
    body = bytearray()
    while len(body) < length:
        more = conn.recv(min(65536, length - len(body)))
        if not more:
            raise EOFError("connection closed inside a message")
        body += more
    return bytes(body), fds


def read_message(conn: socket.socket) -> tuple[dict, list[int]]:
    """Read one length-prefixed JSON message and the fds sent with it."""
    body, fds = read_body(conn)
    return json.loads(body.decode()), fds


def send_body(conn: socket.socket, body: bytes, fds: list[int]) -> None:
    """Send one length-prefixed message body with `fds`, as the host does."""
    data = _HEADER.pack(len(body)) + body
    sent = socket.send_fds(conn, [data], fds)
    if sent < len(data):
        conn.sendall(data[sent:])


def send_reply(conn: socket.socket, reply: dict) -> None:
    conn.sendall(json.dumps(reply).encode() + b"\n")


def descendants(root: int) -> list[int]:
    """Return every process below `root`, read from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        parent = int(stat.rsplit(b")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(name))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def kill_descendants() -> None:
    """Kill and reap every process below this one (a child subreaper)."""
    me = os.getpid()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            # As a subreaper, no child means no descendant at all.
            return
        if pid:
            continue
        for pid in descendants(me):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _exit_code(error: SystemExit) -> int:
    code = error.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _finish(code: int) -> None:
    # What the interpreter does at exit: wait for threads, run atexit, flush.
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code)


def run_python(request: dict, env: dict) -> None:
    """Run Python code in this forked interpreter as `python3 -c` or a file."""
    path = request.get("file")
    if path:
        with open(path, encoding="utf-8") as handle:
            source = handle.read()
        sys.argv = [path]
        first, filename = os.path.dirname(os.path.abspath(path)), path
    else:
        source = request["python"]
        sys.argv = ["-c"]
        first, filename = "", "<string>"
    extra = [entry for entry in env.get("PYTHONPATH", "").split(":") if entry]
    sys.path[:] = [first, *extra, *_BASE_PATH]
    # From this execution's HOME: a spare runner started in another folder.
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    user_site = os.path.expanduser(f"~/.local/lib/{version}/site-packages")
    if site.ENABLE_USER_SITE and os.path.isdir(user_site):
        site.addsitedir(user_site)
    importlib.invalidate_caches()
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    if path:
        main.__dict__["__file__"] = path
    sys.modules["__main__"] = main
    try:
        exec(compile(source, filename, "exec"), main.__dict__)
    except SystemExit as error:
        _finish(_exit_code(error))
    except BaseException as error:
        # Leave out this function's frame, as `python3 -c` shows none.
        trace = error.__traceback__
        error.__traceback__ = trace.tb_next if trace else None
        sys.excepthook(type(error), error, error.__traceback__)
        _finish(1)
    _finish(0)


def prepare_program() -> None:
    """Run the part of a program's start that no request changes; a warm
    program runs it before its request arrives."""
    os.setsid()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # Programs of one sandbox are one trust domain, as processes of one E2B
    # sandbox are: each may inspect the others, not the runner.
    _prctl(_PR_SET_DUMPABLE, 1)
    for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


def rehearse_program() -> None:
    """Run the start of a Python execution on dummy input, in a warm program.

    A forked process takes a copy-on-write page fault for every page it
    first writes, so rehearsing takes those faults before the request
    arrives. Measured on the 2-core development machine, the first `compile`
    took 1.2 ms of a 5 ms execution without the rehearsal and 0.15 ms with it.
    """
    json.loads('{"env": {"PATH": "/usr/bin"}, "limits": {"RLIMIT_CPU": [1, 2]}}')
    compile("import sys\nprint(sys.argv)\n", "<string>", "exec")
    importlib.invalidate_caches()
    types.ModuleType("__main__")


def start_program(request: dict, out: int, err: int) -> None:
    """Apply the request's pipes, limits, env and cwd, then run its code.

    Runs in the program's process after `prepare_program` and never returns.
    """
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(out if out >= 0 else devnull, 1)
        os.dup2(err if err >= 0 else devnull, 2)
        os.closerange(3, 65536)
        for name, value in request["limits"].items():
            limit = getattr(resource, name)
            resource.setrlimit(limit, (value[0], value[1]))
        env = {str(k): str(v) for k, v in request["env"].items()}
        os.makedirs(request["cwd"], exist_ok=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(env)
        if request.get("argv"):
            # An exec'd program starts with default signals, as under
            # subprocess (Python itself ignores SIGPIPE and SIGXFSZ).
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            argv = request["argv"]
            try:
                os.execvpe(argv[0], argv, env)
            except OSError as error:
                os.write(2, f"cannot run {argv[0]}: {error}\n".encode())
                os._exit(127)
        run_python(request, env)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.write(
                2, f"sandbox runner could not start the program: {error}\n".encode()
            )
    os._exit(127)


def _pipes(fds: list[int]) -> tuple[int, int]:
    return (fds[0], fds[1]) if len(fds) >= 2 else (-1, -1)


def wait_program(pid: int, conn: socket.socket, timeout: float) -> tuple[int, bool]:
    """Wait for the program; kill its group at the timeout or if the host
    goes away. Returns its wait status and whether it timed out."""
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(conn, select.POLLIN | select.POLLHUP)
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        events = dict(poller.poll(left * 1000))
        if pidfd in events:
            break
        if conn.fileno() in events:
            # The host closed the connection: the call was cancelled.
            timed_out = True
            break
    if timed_out:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(OSError):
                kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    return status, timed_out


def _become_supervisor(runner: int) -> None:
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    # If the runner dies, so does this supervisor, and the host learns of it
    # from the closed connection.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != runner:
        os._exit(1)


def _report_pid(conn: socket.socket, pid: int) -> None:
    # The program's group, for the host to kill should this process die.
    send_reply(conn, {"pid": pid})


def _finish_execution(conn: socket.socket, request: dict, pid: int) -> None:
    """Wait for program `pid`, kill what it left and reply to the host.

    Runs in a supervisor once the program has its request and the host has
    its pid, and never returns.
    """
    try:
        status, timed_out = wait_program(pid, conn, float(request["timeout"]))
        kill_descendants()
        code = None if timed_out else os.waitstatus_to_exitcode(status)
        send_reply(conn, {"exit_code": code, "timed_out": timed_out})
    except BaseException as error:
        with contextlib.suppress(OSError):
            send_reply(conn, {"error": f"{type(error).__name__}: {error}"})
    # The host reads until end of file. Closing here sends it now, instead
    # of after the kernel has torn down this process's memory.
    try:
        conn.close()
    finally:
        os._exit(0)


def supervise(conn: socket.socket, request: dict, fds: list[int], runner: int) -> None:
    """Fork the program for this request and run the execution.

    Runs in a supervisor forked for the request and never returns.
    """
    try:
        _become_supervisor(runner)
        pid = os.fork()
        if pid == 0:
            conn.close()
            prepare_program()
            start_program(request, *_pipes(fds))
        for fd in fds:
            os.close(fd)
        _report_pid(conn, pid)
    except BaseException as error:
        with contextlib.suppress(OSError):
            send_reply(conn, {"error": f"{type(error).__name__}: {error}"})
        os._exit(0)
    _finish_execution(conn, request, pid)


class Warm:
    """A supervisor and its program, forked and prepared ahead of a request.

    Forking both processes costs more than the rest of a short execution
    (mostly copy-on-write page faults), so the runner forks the pair while
    idle. A request then costs a hand-over: the host's connection to the
    supervisor, its acknowledgement, and the request to the waiting program.
    """

    def __init__(
        self, pid: int, control: socket.socket, program: socket.socket
    ) -> None:
        self.pid = pid
        self.control = control
        self.program = program

    def close(self) -> None:
        self.control.close()
        self.program.close()


def warm_supervisor(
    control: socket.socket, program: socket.socket, runner: int
) -> None:
    """Fork and prepare the program, wait for the host's connection, then
    run the execution.

    Runs in a warm supervisor and never returns.
    """
    try:
        _become_supervisor(runner)
        probe, their_probe = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            control.close()
            probe.close()
            prepare_program()
            rehearse_program()
            try:
                _answer_probe(their_probe)
                request, fds = read_message(program)
            except (OSError, ValueError, EOFError):
                os._exit(127)  # the runner went away, or dropped this pair
            start_program(request, *_pipes(fds))
        program.close()
        their_probe.close()
        header, fds = read_message(control)
        if not fds:
            os._exit(1)
        ended, _ = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if ended or not _program_answers(probe):
            # Killed or stopped from inside the sandbox: without the
            # acknowledgement the runner serves the request with a new pair.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            os._exit(1)
        probe.close()
        conn = socket.socket(fileno=fds[0])
        # The host learns of the program before it can start, and the runner
        # sends the request only after this acknowledgement.
        _report_pid(conn, pid)
        control.sendall(b"+")
        control.close()
    except BaseException:
        # The runner gets no acknowledgement and serves the request itself.
        os._exit(1)
    _finish_execution(conn, header, pid)


def _answer_probe(probe: socket.socket) -> None:
    """Wait in the warm program for its supervisor's probe, and reply to it."""
    if probe.recv(1) != b"?":
        raise EOFError("the supervisor went away")
    probe.sendall(b"!")
    probe.close()


def _program_answers(probe: socket.socket) -> bool:
    """Return whether the warm program replies to a probe in time.

    A program killed from inside the sandbox can still look alive to
    `waitpid` for a while on a loaded machine, until the kernel has run its
    exit. It can no longer reply, so the pair is not used."""
    try:
        probe.settimeout(_PROBE_TIMEOUT)
        probe.sendall(b"?")
        return probe.recv(1) == b"!"
    except OSError:
        return False


def _fork_warm(server: socket.socket, runner: int) -> Warm | None:
    """Fork a warm pair, or return None if the fork failed (process limit)."""
    control, their_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    program, their_program = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = os.fork()
    except OSError:
        for end in (control, their_control, program, their_program):
            end.close()
        return None
    if pid == 0:
        server.close()
        _close_tie()
        control.close()
        program.close()
        warm_supervisor(their_control, their_program, runner)
    their_control.close()
    their_program.close()
    return Warm(pid, control, program)


def _hand_over(
    warm: Warm, conn: socket.socket, body: bytes, request: dict, fds: list[int]
) -> bool:
    """Give the request to the warm pair; False if its supervisor has gone.

    The supervisor gets the host's connection first and acknowledges it, so
    a pair killed from inside the sandbox costs a fresh fork, not the call.
    """
    try:
        header = json.dumps({"timeout": request["timeout"]}).encode()
        send_body(warm.control, header, [conn.fileno()])
        warm.control.settimeout(_ACK_TIMEOUT)
        acknowledged = warm.control.recv(1) == b"+"
    except OSError:
        acknowledged = False
    if acknowledged:
        with contextlib.suppress(OSError):
            send_body(warm.program, body, fds)
    else:
        # A stopped or slow supervisor has a copy of the host's connection,
        # which would keep it open after the request's own supervisor ends.
        with contextlib.suppress(OSError):
            os.kill(warm.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(warm.pid, 0)
    warm.close()
    return acknowledged


def _serve_connection(
    conn: socket.socket, server: socket.socket, runner: int, warm: Warm | None
) -> tuple[float | None, bool, Warm | None]:
    """Serve one request; return its new lifetime, whether it requested a
    stop, and the warm pair left (None once used).

    A function of its own, so that the request (its env included) is off the
    runner's stack when the next warm pair is forked: a program runs on top
    of that stack and could read it from the frames.
    """
    fds: list[int] = []
    lifetime: float | None = None
    try:
        conn.settimeout(10)
        body, fds = read_body(conn)
        request = json.loads(body.decode())
        if "lifetime" in request:
            lifetime = float(request["lifetime"])
        if request.get("claim"):
            _close_tie()
        if request.get("op") == "exec":
            conn.settimeout(None)
            handed = warm is not None and _hand_over(warm, conn, body, request, fds)
            warm = None
            if not handed and os.fork() == 0:
                server.close()
                _close_tie()
                supervise(conn, request, fds, runner)
        elif request.get("op") == "stop":
            send_reply(conn, {"stopped": True})
            return lifetime, True, warm
        else:
            send_reply(conn, {"ok": True})
    except (OSError, ValueError, EOFError):
        pass
    finally:
        conn.close()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    return lifetime, False, warm


def _close_tie() -> None:
    global _tie
    if _tie is not None:
        os.close(_tie)
        _tie = None


def _worker_died() -> bool:
    """Return whether the spare's worker closed its end of the pipe."""
    if _tie is None:
        return False
    ready, _, _ = select.select([_tie], [], [], 0)
    return bool(ready) and os.read(_tie, 1) == b""


def serve(listen_fd: int, lifetime: float, tie: int | None = None) -> None:
    """Accept requests until the lifetime ends without a keep-alive, or
    until the worker of an unclaimed spare dies."""
    global _tie
    _tie = tie
    server = socket.socket(fileno=listen_fd)
    server.setblocking(True)
    # Code in the sandbox runs as the same user; keep it out of this
    # process's memory and fds (the listening socket).
    _prctl(_PR_SET_DUMPABLE, 0)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    runner = os.getpid()
    deadline = time.monotonic() + lifetime
    warm = _fork_warm(server, runner)
    while True:
        try:
            while ended := os.waitpid(-1, os.WNOHANG)[0]:
                if warm is not None and ended == warm.pid:
                    # Killed from inside the sandbox; its program died with it.
                    warm.close()
                    warm = None
        except ChildProcessError:
            pass
        left = deadline - time.monotonic()
        if left <= 0 or _worker_died():
            break
        watched = [listen_fd] if _tie is None else [listen_fd, _tie]
        ready, _, _ = select.select(watched, [], [], min(left, 1.0))
        if listen_fd not in ready:
            if warm is None:
                warm = _fork_warm(server, runner)
            continue
        conn, _ = server.accept()
        extended, stop, warm = _serve_connection(conn, server, runner, warm)
        if extended is not None:
            deadline = time.monotonic() + extended
        if stop:
            break
        if warm is None:
            # The next request's pair, forked while the program runs.
            warm = _fork_warm(server, runner)
    if warm is not None:
        warm.close()
    server.close()
    kill_descendants()


if __name__ == "__main__":
    serve(
        int(sys.argv[1]),
        float(sys.argv[2]),
        int(sys.argv[3]) if len(sys.argv) > 3 else None,
    )

"""The local backend's warm runner, in both isolation modes, with real
processes: Python semantics, process-tree kills, runner death."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app.contracts.sandbox import ExecuteRequest
from app.sandbox import runtime
from app.sandbox.backend import (
    RunOutput,
    SandboxBackendError,
    SandboxLostError,
    SandboxSetupError,
)
from app.sandbox.local import (
    LocalBackend,
    ResourceLimits,
    _captured,
    _pids_cgroup_root,
)
from app.sandbox.runner import descendants
from app.settings import Settings
from tests.support.sandboxes import ISOLATION_MODES

# The sandbox's python3 is the host's, whose user site folder is named by it.
PYTHON_VERSION = subprocess.run(
    ["python3", "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
    capture_output=True,
    text=True,
    check=True,
).stdout.strip()


async def run(
    backend: LocalBackend, argv: list[str], timeout: float = 30, **env: str
) -> RunOutput:
    return await backend.run(
        "box", argv, env=env, cwd=None, timeout=timeout, output_limit=65536
    )


async def test_python_runs_as_python_dash_c(backend: LocalBackend) -> None:
    code = (
        "import os, sys\n"
        "print(sys.argv, sys.path[0] == '', os.environ['GREETING'], os.getcwd())\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(7)\n"
    )
    result = await run(backend, ["python3", "-c", code], GREETING="hello")
    home = await backend.home("box")
    assert result.stdout == f"['-c'] True hello {home}\n"
    assert result.stderr == "to stderr\n"
    assert result.exit_code == 7
    failed = await run(backend, ["python3", "-c", "x = 1\nraise ValueError('boom')"])
    assert failed.exit_code == 1
    assert failed.stderr.splitlines() == [
        "Traceback (most recent call last):",
        '  File "<string>", line 2, in <module>',
        "ValueError: boom",
    ]
    # Each execution starts from a fresh __main__: nothing carries over.
    first = await run(backend, ["python3", "-c", "leak = 1"])
    second = await run(backend, ["python3", "-c", "print('leak' in globals())"])
    assert (first.exit_code, second.stdout) == (0, "False\n")
    threads = await run(
        backend,
        [
            "python3",
            "-c",
            "import threading, time\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), print('t'))).start()",
        ],
    )
    assert threads.stdout == "t\n"
    message = await run(backend, ["python3", "-c", "raise SystemExit('bye')"])
    assert (message.exit_code, message.stderr) == (1, "bye\n")


async def test_commands_and_pythonpath(backend: LocalBackend) -> None:
    home = await backend.home("box")
    await backend.write_file("box", "lib/demo_mod.py", b"VALUE = 42\n")
    imported = await run(
        backend,
        ["python3", "-c", "import demo_mod; print(demo_mod.VALUE)"],
        PYTHONPATH=f"{home}/lib",
    )
    assert imported.stdout == "42\n", imported
    bash = await run(backend, ["bash", "-c", "echo $WORD; exit 4"], WORD="bash")
    assert (bash.stdout, bash.exit_code) == ("bash\n", 4)
    missing = await run(backend, ["no-such-command-xyz"])
    assert missing.exit_code == 127
    assert "no-such-command-xyz" in missing.stderr
    path = await backend.write_file("box", "script.py", b"import sys; print(sys.argv)")
    script = await run(backend, ["python3", path])
    assert script.stdout == f"['{path}']\n"


async def test_setsid_escape_is_killed(backend: LocalBackend) -> None:
    # A grandchild in a session of its own would survive a group kill.
    escape = "setsid sh -c 'sleep 2; echo late > {name}' & "
    timed = await run(
        backend, ["bash", "-c", escape.format(name="late1.txt") + "sleep 30"], 1
    )
    assert timed.timed_out and timed.exit_code is None
    detached = await run(
        backend,
        [
            "python3",
            "-c",
            "import os, subprocess\n"
            "subprocess.Popen(['sh', '-c', 'sleep 2; echo late > late2.txt'],"
            " start_new_session=True)\n"
            "print('started', flush=True)\n",
        ],
    )
    assert (detached.stdout, detached.exit_code) == ("started\n", 0)
    # Both would have written their file by now had they survived.
    check = await run(backend, ["bash", "-c", "sleep 3; ls late1.txt late2.txt"])
    assert check.exit_code != 0
    assert "late1.txt" in check.stderr and "late2.txt" in check.stderr


async def test_stop_removes_files_keeps_state(backend: LocalBackend) -> None:
    await backend.write_file("box", "kept.txt", b"data")
    await backend.stop("box")
    assert not backend.folder("box").exists()
    described = await backend.describe("box")
    assert (described.alive, described.state) == (False, "stopped")
    with pytest.raises(SandboxLostError, match="stopped"):
        await backend.run(
            "box", ["true"], env={}, cwd=None, timeout=5, output_limit=100
        )
    await backend.delete("box")
    assert not (backend.root / "box").exists()


def fail_unlink_of(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every `os.unlink` of a file called `name` fail."""
    unlink = os.unlink

    def fail_on_name(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fsdecode(path) == name:
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", fail_on_name)


async def test_failed_removal_keeps_state(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.write_file("box", "stuck.txt", b"data")
    fail_unlink_of("stuck.txt", monkeypatch)
    with pytest.raises(SandboxBackendError) as failure:
        await backend.delete("box")
    message = str(failure.value)
    assert "sandbox box could not be fully removed" in message, message
    assert "'stuck.txt'" in message, message
    assert "delete the sandbox again" in message, message
    # The state file stays, so the sandbox is still found and reads as lost.
    assert (backend.root / "box" / "state.json").exists()
    assert (backend.folder("box") / "stuck.txt").exists()
    assert (await backend.describe("box")).state == "lost"
    monkeypatch.undo()
    await backend.delete("box")
    assert not (backend.root / "box").exists()


async def test_stop_with_stuck_file_stops(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.write_file("box", "stuck.txt", b"data")
    fail_unlink_of("stuck.txt", monkeypatch)
    await backend.stop("box")
    described = await backend.describe("box")
    assert (described.alive, described.state) == (False, "stopped")
    assert (backend.folder("box") / "stuck.txt").exists()
    monkeypatch.undo()
    await backend.delete("box")
    assert not (backend.root / "box").exists()


# Build a sandbox folder whose code took its own write and search
# permissions away, then remove it with the backend's removal.
_REMOVE_READ_ONLY = """
import os, sys
from pathlib import Path
from app.sandbox.local import _remove_tree
base = Path(sys.argv[1])
box = base / "box"
(box / "locked").mkdir(parents=True)
(box / "locked" / "file.txt").write_text("x")
(box / "sealed" / "inner").mkdir(parents=True)
(box / "sealed" / "inner" / "file.txt").write_text("x")
(box / "link").symlink_to(base / "outside")
os.chmod(box / "locked", 0o500)
os.chmod(box / "sealed", 0)
os.chmod(box, 0o500)
_remove_tree(box)
"""


def _without_root_permissions() -> list[str]:
    """Return a command prefix under which file permissions bind this user.

    Root passes every permission check through CAP_DAC_OVERRIDE and its
    kin, so a root run drops them from its capability bounding set.
    """
    if os.geteuid() != 0:
        return []
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    try:
        subprocess.run([*drop, "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot drop root's file capabilities with setpriv: {error}")
    return drop


def test_read_only_folders_removed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.txt").write_text("kept")
    outside.chmod(0o500)
    command = [*_without_root_permissions(), sys.executable, "-c"]
    result = subprocess.run(
        [*command, _REMOVE_READ_ONLY, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "box").exists()
    # The symlink was removed, and neither followed nor its target changed.
    assert (outside / "kept.txt").read_text() == "kept"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o500


async def test_stop_during_execution_says_stopped(backend: LocalBackend) -> None:
    task = asyncio.create_task(
        run(backend, ["bash", "-c", "touch started; sleep 30"], timeout=60)
    )
    home = backend.folder("box")
    while not (home / "started").exists():
        await asyncio.sleep(0.05)
    await backend.stop("box")
    result = await task
    assert result.exit_code is None
    assert not result.timed_out
    assert "sandbox box was stopped during this execution" in result.stderr
    assert "not recreated; create a new one" in result.stderr
    assert "recreates the sandbox" not in result.stderr


async def test_delete_during_execution_says_deleted(backend: LocalBackend) -> None:
    task = asyncio.create_task(
        run(backend, ["bash", "-c", "touch started; sleep 30"], timeout=60)
    )
    home = backend.folder("box")
    while not (home / "started").exists():
        await asyncio.sleep(0.05)
    await backend.delete("box")
    result = await task
    assert result.exit_code is None
    assert not result.timed_out
    assert "sandbox box was deleted during this execution" in result.stderr
    assert "runner failed" not in result.stderr
    assert "recreates the sandbox" not in result.stderr


async def test_large_program_files_removed(
    backend: LocalBackend, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path)
    # Longer than the inline limit, so each program goes through a file.
    padding = "#" + "x" * 100_001 + "\n"
    cases = [
        ("completed", "print('done')", 30.0),
        ("failed", "raise SystemExit(3)", 30.0),
        ("timed_out", "import time; time.sleep(30)", 1.0),
    ]
    for status, body, timeout in cases:
        request = ExecuteRequest(code=padding + body, timeout=timeout)
        result = await runtime.execute(backend, "box", request, {}, settings)
        assert result.status == status, result
    # Two runs of the same program at once: neither may lose its file.
    same = ExecuteRequest(code=padding + "import time; time.sleep(0.5); print(1)")
    results = await asyncio.gather(
        runtime.execute(backend, "box", same, {}, settings),
        runtime.execute(backend, "box", same, {}, settings),
    )
    assert [result.stdout for result in results] == ["1\n", "1\n"]
    left = sorted(path.name for path in backend.folder("box").glob(".nexus/code-*"))
    assert left == []


async def test_call_counts_starts_cut_short(
    backend: LocalBackend, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path)
    gated = ExecuteRequest(
        code=(
            "import pathlib, time\n"
            "pathlib.Path('started').touch()\n"
            "while not pathlib.Path('gate').exists():\n    time.sleep(0.05)\n"
            "print('done')\n"
        ),
        call_id="step-1",
    )
    folder = backend.folder("box")
    first = asyncio.create_task(runtime.execute(backend, "box", gated, {}, settings))
    while not (folder / "started").exists():
        await asyncio.sleep(0.05)
    # As a worker that dies while the program runs: the call is cut short,
    # and the same call is made again.
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    (folder / "gate").touch()
    again = await runtime.execute(backend, "box", gated, {}, settings)
    assert (again.stdout, again.runs) == ("done\n", 2)
    # A finished call keeps its count until the caller says its result is
    # recorded: a worker that died after the program ended, before the
    # result reached the server, makes the call once more.
    after_finish = await runtime.execute(backend, "box", gated, {}, settings)
    assert after_finish.runs == 3
    # Other calls count their own, and remove the counts of settled calls.
    other = gated.model_copy(update={"call_id": "step-2"})
    settled = await runtime.execute(
        backend, "box", other, {}, settings, settled_call_ids=["step-1"]
    )
    assert settled.runs == 1
    assert len(list((folder / ".nexus" / "calls").iterdir())) == 1
    plain = gated.model_copy(update={"call_id": None})
    assert (await runtime.execute(backend, "box", plain, {}, settings)).runs == 1


async def test_file_env_inputs(backend: LocalBackend, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    large = "y" * 200_000
    request = ExecuteRequest(
        code=(
            "import os\n"
            "print(open(os.environ['BIG_FILE']).read() == 'y' * 200000)\n"
            "print(os.path.basename(os.environ['BIG_FILE']).startswith('input-'))\n"
        ),
        file_env={"BIG_FILE": large},
    )
    result = await runtime.execute(backend, "box", request, {}, settings)
    assert result.stdout == "True\nTrue\n", result.stderr
    assert list(backend.folder("box").glob(".nexus/input-*")) == []


@pytest.mark.parametrize("planted", ["file", "symlink", "calls file"])
async def test_platform_folder_taken_back(
    backend: LocalBackend, tmp_path: Path, planted: str
) -> None:
    # Code in the sandbox put something where the platform's `.nexus` goes.
    folder = backend.folder("box")
    target = tmp_path / "target"
    target.mkdir()
    nexus = folder / ".nexus"
    if nexus.is_dir():
        shutil.rmtree(nexus)
    if planted == "file":
        nexus.write_text("mine")
    elif planted == "symlink":
        nexus.symlink_to(target)
    else:
        nexus.mkdir()
        (nexus / "calls").write_text("mine")
    settings = Settings(data_dir=tmp_path)
    request = ExecuteRequest(
        code="import os; print(open(os.environ['IN']).read())",
        call_id="step-1",
        file_env={"IN": "input"},
    )
    result = await runtime.execute(backend, "box", request, {}, settings)
    assert (result.stdout, result.runs) == ("input\n", 1), result.stderr
    assert (folder / ".nexus").is_dir()
    assert list(target.iterdir()) == []


async def test_read_file_follows_no_links(backend: LocalBackend) -> None:
    folder = backend.folder("box")
    await backend.write_file("box", "data/plain.txt", b"abcdef")
    assert await backend.read_file("box", "data/plain.txt", 4) == b"abcd"
    assert await backend.read_file("box", "data/missing.txt", 4) is None
    os.symlink("/etc/hostname", folder / "data" / "link")
    with pytest.raises(ValueError, match="cannot read"):
        await backend.read_file("box", "data/link", 100)
    os.mkfifo(folder / "data" / "pipe")
    with pytest.raises(ValueError, match="not a regular file"):
        await backend.read_file("box", "data/pipe", 100)
    with pytest.raises(ValueError):
        await backend.read_file("box", "../outside", 100)


async def test_read_and_remove_through_folder_links(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """A folder symlink planted in the sandbox reads as no file, and a removal
    through it removes nothing, so neither reaches the folder it points to."""
    folder = backend.folder("box")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.txt").write_text("kept")
    os.symlink(outside, folder / "linked")
    assert await backend.read_file("box", "linked/kept.txt", 10) is None
    await backend.remove_file("box", "linked/kept.txt")
    assert (outside / "kept.txt").read_text() == "kept"
    await backend.remove_file("box", "missing/kept.txt")
    await backend.remove_file("box", "linked")  # the link, not its target
    assert not (folder / "linked").exists()
    assert (outside / "kept.txt").exists()


async def test_bwrap_arguments_stay_hidden(backend: LocalBackend) -> None:
    if not backend.bwrap:
        pytest.skip("only bubblewrap hides the host's paths from the sandbox")
    code = (
        "import os\n"
        "for pid in sorted(p for p in os.listdir('/proc') if p.isdigit()):\n"
        "    try:\n"
        "        data = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    print(pid, data.replace(b'\\0', b' ').decode())\n"
    )
    result = await run(backend, ["python3", "-c", code])
    lines = result.stdout.splitlines()
    assert lines[0].startswith("1 "), result
    assert len(lines) >= 3, result
    for line in lines:
        assert str(backend.root) not in line, line
        assert "--bind" not in line, line


async def test_executions_extend_the_expiry(backend: LocalBackend) -> None:
    created = (await backend.describe("box")).expires_at
    assert created is not None
    await backend.run(
        "box", ["true"], env={}, cwd=None, timeout=5, output_limit=100, keep_alive=900
    )
    extended = (await backend.describe("box")).expires_at
    assert extended is not None and extended - created > timedelta(seconds=500)
    # A sandbox made before the expiry file reads the expiry from its state.
    (backend.root / "box" / "expiry").unlink()
    assert (await backend.describe("box")).expires_at == created


def _runner_processes(backend: LocalBackend) -> tuple[int, list[int]]:
    """Return the runner's pid and the pids of its warm pair."""
    state = backend._read_state("box")
    assert state is not None
    pythons = []
    for pid in descendants(int(state["anchor_pid"])):  # type: ignore[call-overload]
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("python3"):
                pythons.append(pid)
        except FileNotFoundError:
            continue  # an execution that has just ended
    # descendants() lists parents before their children: the runner first.
    return pythons[0], pythons[1:]


async def _warm_pair(backend: LocalBackend) -> tuple[int, list[int]]:
    for _ in range(200):
        runner, warm = _runner_processes(backend)
        if len(warm) == 2:
            return runner, warm
        await asyncio.sleep(0.02)
    raise AssertionError(f"no warm pair below runner {runner}: {warm}")


async def test_concurrent_executions_keep_their_own_output(
    backend: LocalBackend,
) -> None:
    # The first takes the warm pair; the others arrive while it is re-forked.
    code = "import sys, time; time.sleep({delay}); print({n}); sys.exit({n})"
    results = await asyncio.gather(
        *(
            run(backend, ["python3", "-c", code.format(delay=0.2 * (n % 2), n=n)])
            for n in range(1, 6)
        )
    )
    assert [(r.stdout, r.exit_code) for r in results] == [
        (f"{n}\n", n) for n in range(1, 6)
    ]


async def test_killed_warm_pair_is_replaced(backend: LocalBackend) -> None:
    _, warm = await _warm_pair(backend)
    for pid in warm:
        os.kill(pid, signal.SIGKILL)
    # Its end is unnoticed until a request tries to hand over: that one
    # starts its own pair, and the runner forks a new warm pair after it.
    for expected in ("first", "second"):
        result = await run(backend, ["python3", "-c", f"print('{expected}')"])
        assert (result.stdout, result.exit_code) == (f"{expected}\n", 0)
    _, replaced = await _warm_pair(backend)
    assert set(replaced).isdisjoint(warm)


async def test_warm_pair_holds_no_listening_socket(backend: LocalBackend) -> None:
    runner, warm = await _warm_pair(backend)
    listen_fd = Path(f"/proc/{runner}/cmdline").read_bytes().split(b"\0")[-3]
    try:
        listening = os.readlink(f"/proc/{runner}/fd/{int(listen_fd)}")
    except PermissionError:
        pytest.skip("reading another process's fds needs root here")
    assert listening.startswith("socket:")
    for pid in warm:
        open_fds = {
            os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
        }
        assert listening not in open_fds, (
            f"warm process {pid} holds the runner's socket"
        )


async def test_runner_death_loses_the_sandbox(backend: LocalBackend) -> None:
    state = backend._read_state("box")
    assert state is not None
    anchor = int(state["anchor_pid"])  # type: ignore[call-overload]
    # The runner is the anchor's python3 descendant (below bwrap if used).
    runners = [
        pid
        for pid in descendants(anchor)
        if Path(f"/proc/{pid}/comm").read_text().strip().startswith("python3")
    ]
    assert runners
    task = asyncio.create_task(
        run(backend, ["bash", "-c", "touch started; sleep 30"], timeout=60)
    )
    home = backend.folder("box")
    while not (home / "started").exists():
        await asyncio.sleep(0.05)
    os.kill(runners[0], signal.SIGKILL)
    result = await task
    assert result.exit_code is None and not result.timed_out
    assert "sandbox runner failed during this execution" in result.stderr
    with pytest.raises(SandboxLostError):
        for _ in range(200):
            await run(backend, ["true"])
            await asyncio.sleep(0.05)
    described = await backend.describe("box")
    assert not described.alive


async def test_keep_alive_keeps_the_runner(backend: LocalBackend) -> None:
    await backend.keep_alive("box", 600)
    state = backend._read_state("box")
    assert state is not None
    described = await backend.describe("box")
    assert described.alive and described.state == "running"
    result = await run(backend, ["python3", "-c", "print(1)"])
    assert result.stdout == "1\n"


@pytest.mark.parametrize("use_bwrap", ISOLATION_MODES)
async def test_spare_becomes_the_sandbox(use_bwrap: bool, tmp_path: Path) -> None:
    local = LocalBackend(tmp_path / "sandboxes", use_bwrap=use_bwrap, spares=1)
    try:
        await local.create("first", template="python", timeout=300, env={}, metadata={})
        # The refill waits until no call has run for a moment.
        assert local._spares == []
        for _ in range(100):
            if local._spares:
                break
            await asyncio.sleep(0.05)
        assert len(local._spares) == 1
        spare = local._spares[0]
        await local.create("second", template="base", timeout=1, env={}, metadata={})
        assert not (tmp_path / "sandboxes" / spare).exists()
        home = await local.home("second")
        await local.write_file("second", "data.txt", b"mine")
        result = await local.run(
            "second",
            ["python3", "-c", "import os; print(os.getcwd(), open('data.txt').read())"],
            env={},
            cwd=None,
            timeout=30,
            output_limit=1000,
        )
        assert result.stdout == f"{home} mine\n", result
        # Its runner ends at the new timeout and the anchor removes the
        # folder under its new name.
        folder = local.folder("second")
        for _ in range(200):
            if not folder.exists():
                break
            await asyncio.sleep(0.05)
        assert not folder.exists()
        assert (await local.describe("second")).state == "expired"
    finally:
        await local.delete("first")
        await local.delete("second")
        await local.close()
    assert list((tmp_path / "sandboxes").iterdir()) == []


@pytest.mark.parametrize("use_bwrap", ISOLATION_MODES)
async def test_unused_spares_leave_no_folder(use_bwrap: bool, tmp_path: Path) -> None:
    """A spare whose worker died ends at its lifetime and takes its whole
    folder with it; folders that earlier workers left are removed."""
    root = tmp_path / "sandboxes"
    local = LocalBackend(root, use_bwrap=use_bwrap, spares=1)
    left = root / "_spare-000000000000"
    (left / "home").mkdir(parents=True)
    (left / "state.json").write_text("{}")
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    young = root / "_spare-111111111111"
    (young / "home").mkdir(parents=True)
    try:
        # As a killed worker's spare: no worker deletes it, its runner ends.
        orphan = "_spare-222222222222"
        (local.folder(orphan) / ".nexus" / "tmp").mkdir(parents=True)
        local._start_runner(orphan, 1)
        local._refill_spares()
        assert not left.exists()
        assert young.exists()
        for _ in range(200):
            if not (root / orphan).exists():
                break
            await asyncio.sleep(0.05)
        assert not (root / orphan).exists()
    finally:
        await local.close()
    assert sorted(p.name for p in root.iterdir()) == [young.name]


# A worker that starts one spare, prints its folder and anchor pid, and waits.
_SPARE_WORKER = """
import sys, time
from pathlib import Path
from app.sandbox.local import LocalBackend
local = LocalBackend(Path(sys.argv[1]), use_bwrap=sys.argv[2] == "bwrap", spares=1)
local._refill_spares()
[spare] = local._spares
print(spare, local._read_state(spare)["anchor_pid"], flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("use_bwrap", ISOLATION_MODES)
def test_spare_dies_with_killed_worker(use_bwrap: bool, tmp_path: Path) -> None:
    root = tmp_path / "sandboxes"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SPARE_WORKER,
            str(root),
            "bwrap" if use_bwrap else "plain",
        ],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        spare, anchor = worker.stdout.readline().split()
    finally:
        worker.kill()
        worker.wait()

    # Its lifetime is 5 minutes, so only the worker's death can end it here.
    for _ in range(600):
        if not Path(f"/proc/{anchor}").exists() and not (root / spare).exists():
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{anchor}").exists()
    assert not (root / spare).exists()


def _zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return False


async def test_anchor_killed_elsewhere_is_reaped(tmp_path: Path) -> None:
    creator = LocalBackend(tmp_path / "sandboxes", use_bwrap=False)
    other = LocalBackend(tmp_path / "sandboxes", use_bwrap=False)
    await creator.create("first", template="base", timeout=300, env={}, metadata={})
    state = creator._read_state("first")
    assert state is not None
    anchor = int(state["anchor_pid"])  # type: ignore[call-overload]
    # Another worker process's backend deletes it, so `creator` never waits.
    await other.delete("first")
    for _ in range(200):
        if _zombie(anchor):
            break
        await asyncio.sleep(0.05)
    assert _zombie(anchor)
    await creator.create("second", template="base", timeout=300, env={}, metadata={})
    try:
        assert not _zombie(anchor)
        assert "first" not in creator._anchors
    finally:
        await creator.delete("second")


def _sandbox_processes(backend: LocalBackend, backend_id: str) -> list[int]:
    """Return the pids of a sandbox's anchor and every process below it."""
    state = backend._read_state(backend_id)
    assert state is not None
    anchor = int(state["anchor_pid"])  # type: ignore[call-overload]
    below = descendants(anchor)
    assert below, "the anchor has no runner below it"
    return [anchor, *below]


async def _wait_ended(pids: list[int]) -> list[int]:
    """Wait up to 10 s for `pids` to end, and return those still running."""
    running = pids
    for _ in range(200):
        running = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        running = [pid for pid in running if not _zombie(pid)]
        if not running:
            break
        await asyncio.sleep(0.05)
    return running


@pytest.mark.parametrize("use_bwrap", ISOLATION_MODES)
@pytest.mark.parametrize("ending", ["lost check", "delete"])
async def test_removed_folder_processes_ended(
    use_bwrap: bool, ending: str, tmp_path: Path
) -> None:
    """A sandbox whose folder, state file included, was removed from outside
    is lost. The lost check or the delete of another worker process's backend
    ends its anchor, bubblewrap and runner."""
    creator = LocalBackend(tmp_path / "sandboxes", use_bwrap=use_bwrap)
    other = LocalBackend(tmp_path / "sandboxes", use_bwrap=use_bwrap)
    await creator.create("box", template="base", timeout=300, env={}, metadata={})
    processes = _sandbox_processes(creator, "box")
    try:
        shutil.rmtree(tmp_path / "sandboxes" / "box")
        if ending == "lost check":
            with pytest.raises(SandboxLostError, match="state file is missing"):
                await other.run(
                    "box", ["true"], env={}, cwd=None, timeout=30, output_limit=65536
                )
            assert await _wait_ended(processes) == []
        await other.delete("box")
        assert await _wait_ended(processes) == []
    finally:
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("use_bwrap", ISOLATION_MODES)
async def test_close_ends_removed_folder_processes(
    use_bwrap: bool, tmp_path: Path
) -> None:
    """Closing a backend, as a worker does when `nexus up` stops, ends the
    processes of sandboxes whose folder was removed, and only those."""
    creator = LocalBackend(tmp_path / "sandboxes", use_bwrap=use_bwrap)
    other = LocalBackend(tmp_path / "sandboxes", use_bwrap=use_bwrap)
    await creator.create("lost", template="base", timeout=300, env={}, metadata={})
    await creator.create("kept", template="base", timeout=300, env={}, metadata={})
    lost = _sandbox_processes(creator, "lost")
    kept = _sandbox_processes(creator, "kept")
    try:
        shutil.rmtree(tmp_path / "sandboxes" / "lost")
        await other.close()
        assert await _wait_ended(lost) == []
        assert all(Path(f"/proc/{pid}").exists() for pid in kept)
        assert not any(_zombie(pid) for pid in kept)
        result = await creator.run(
            "kept", ["echo", "alive"], env={}, cwd=None, timeout=30, output_limit=65536
        )
        assert result.stdout == "alive\n"
    finally:
        await creator.delete("kept")
        for pid in lost:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_upload_never_follows_symlinks(
    backend: LocalBackend, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    home = backend.folder("box")
    (home / "link").symlink_to(outside)
    (home / "file_link").symlink_to(outside / "target.txt")
    (home / "real").mkdir()
    (home / "inner").symlink_to("real")
    (home / "plain.txt").write_text("x")
    for path, part in [
        ("link/sub/deep/f.txt", "link"),
        ("link/f.txt", "link"),
        ("file_link", "file_link"),
        ("inner/f.txt", "inner"),
    ]:
        with pytest.raises(ValueError) as rejected:
            await backend.write_file("box", path, b"escaped")
        assert f"goes through the symlink {part!r}" in str(rejected.value)
    # Nothing was created outside the sandbox folder, not even a folder.
    assert list(outside.iterdir()) == []
    with pytest.raises(ValueError) as not_folder:
        await backend.write_file("box", "plain.txt/f.txt", b"x")
    assert "'plain.txt'" in str(not_folder.value)
    written = await backend.write_file("box", "real/a/b.txt", b"kept")
    assert written.endswith("/real/a/b.txt")
    assert (home / "real" / "a" / "b.txt").read_bytes() == b"kept"


async def test_upload_rejects_fifo_without_blocking(backend: LocalBackend) -> None:
    """An upload onto a FIFO made in the sandbox is rejected at once. A
    blocking open would wait for a reader: the watchdog thread opens the
    read end after 10 s so that a failing test ends."""
    await run(backend, ["bash", "-c", "mkfifo trap.txt && mkdir folder"])
    fifo = backend.folder("box") / "trap.txt"
    released = threading.Event()

    def watchdog() -> None:
        if not done.wait(10):
            released.set()
            with open(fifo, "rb") as reader:
                reader.read()

    done = threading.Event()
    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        with pytest.raises(ValueError) as rejected:
            await backend.write_file("box", "trap.txt", b"x")
    finally:
        done.set()
        thread.join()
    assert not released.is_set(), "the upload waited for a reader of the FIFO"
    assert "file_path 'trap.txt'" in str(rejected.value)
    assert "not a regular file" in str(rejected.value)
    # With a reader present, an open would succeed: nothing is written.
    reader_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            await backend.write_file("box", "trap.txt", b"x")
        assert os.read(reader_fd, 10) == b""
    finally:
        os.close(reader_fd)
    with pytest.raises(ValueError, match="file_path 'folder'"):
        await backend.write_file("box", "folder", b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


async def test_installers_run_no_planted_code(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """Code planted by the sandbox's own code must not run inside an
    installer, which gets the network even where the sandbox has none."""
    settings = Settings(
        data_dir=tmp_path, sandbox_package_index="http://127.0.0.1:9/simple"
    )
    home = await backend.home("box")
    marker = "import pathlib; pathlib.Path({!r}).touch()\n"
    files = {
        ".nexus/python/sitecustomize.py": marker.format(f"{home}/SITE"),
        "pip/__init__.py": "",
        "pip/__main__.py": marker.format(f"{home}/PIP"),
        "evil.js": f"require('fs').writeFileSync('{home}/NODE', '')",
        "evil.sh": f"#!/bin/sh\ntouch {home}/SHELL\n",
        # Modules and `.pth` files that a Python launcher would load.
        "json.py": marker.format(f"{home}/JSONMOD") + "from _json import *\n",
        f".local/lib/python{PYTHON_VERSION}/site-packages/zz.pth": (
            marker.format(f"{home}/PTH").replace("\n", "") + "\n"
        ),
        ".npmrc": f"script-shell={home}/evil.sh\nregistry=http://127.0.0.1:9/\n",
        # A dependency that npm would fetch from a host of the code's choosing.
        "package.json": (
            '{"name": "planted", "version": "1.0.0", '
            '"dependencies": {"evil": "http://127.0.0.1:9/evil.tgz"}}'
        ),
        "dep/package.json": (
            '{"name": "dep", "version": "1.0.0", '
            f'"scripts": {{"postinstall": "touch {home}/DEP"}}}}'
        ),
    }
    plant = (
        "import os, pathlib\n"
        f"for name, text in {files!r}.items():\n"
        "    os.makedirs(os.path.dirname(name) or '.', exist_ok=True)\n"
        "    pathlib.Path(name).write_text(text)\n"
        "os.chmod('evil.sh', 0o755)\n"
    )
    planted = await run(backend, ["python3", "-c", plant])
    assert planted.exit_code == 0, planted.stderr
    env = {"NODE_OPTIONS": f"--require {home}/evil.js"}
    # No index listens at the configured address, so each installer fails
    # once it runs, after it read what configuration it reads.
    with contextlib.suppress(SandboxSetupError):
        await runtime.apply_setup(
            backend,
            "box",
            template="base",
            packages=["nexus-no-such-package"],
            commands=[],
            env=env,
            settings=settings,
        )
    if shutil.which("npm") is not None:
        with contextlib.suppress(SandboxSetupError):
            await runtime.apply_setup(
                backend,
                "box",
                template="node",
                packages=["nexus-no-such-package"],
                commands=[],
                env=env,
                settings=settings,
            )
        # A folder package is refused: its package.json could name URLs.
        with pytest.raises(SandboxSetupError, match="not folders, URLs"):
            await runtime.apply_setup(
                backend,
                "box",
                template="node",
                packages=["./dep"],
                commands=[],
                env=env,
                settings=settings,
            )
    ran = sorted(
        name
        for name in ("SITE", "PIP", "NODE", "SHELL", "JSONMOD", "PTH")
        if (backend.folder("box") / name).exists()
    )
    assert ran == []
    if shutil.which("npm") is not None:
        assert not (backend.folder("box") / "DEP").exists()
        assert not (backend.folder("box") / "node_modules" / "evil").exists()


@pytest.mark.parametrize("use_bwrap", ISOLATION_MODES)
async def test_process_limit_holds_for_root(use_bwrap: bool, tmp_path: Path) -> None:
    """The process limit applies in executions and in installers even where
    the worker runs as root, whom the kernel exempts from RLIMIT_NPROC."""
    if os.geteuid() == 0 and _pids_cgroup_root() is None:
        pytest.skip("run by root, only a writable pids cgroup limits processes")
    limited = LocalBackend(
        tmp_path / "sandboxes",
        use_bwrap=use_bwrap,
        limits=ResourceLimits(processes=64),
    )
    await limited.create("box", template="base", timeout=300, env={}, metadata={})
    code = (
        "import os, time\n"
        "started = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(5)\n"
        "        os._exit(0)\n"
        "    started += 1\n"
        "print(started)\n"
    )
    try:
        for network in (False, True):
            result = await limited.run(
                "box",
                ["python3", "-c", code],
                env={},
                cwd=None,
                timeout=30,
                output_limit=65536,
                network=network,
            )
            assert result.exit_code == 0, result.stderr
            assert 0 < int(result.stdout) < 64, (network, result.stdout)
    finally:
        await limited.delete("box")


@pytest.mark.parametrize("use_bwrap", ISOLATION_MODES)
async def test_pids_cgroups_removed_when_done(
    use_bwrap: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandbox's pids cgroup goes with its delete, and an installer's when
    it ends, even with processes left in them, rather than at the next
    sandbox's start."""
    if os.geteuid() != 0 or _pids_cgroup_root() is None:
        pytest.skip("pids cgroups are made only by root, where they are writable")
    backend = LocalBackend(tmp_path / "sandboxes", use_bwrap=use_bwrap)
    made: list[Path] = []
    make = backend._make_pids_cgroup

    def recording() -> Path | None:
        procs = make()
        assert procs is not None
        made.append(procs.parent)
        return procs

    monkeypatch.setattr(backend, "_make_pids_cgroup", recording)
    await backend.create("box", template="base", timeout=300, env={}, metadata={})
    try:
        # A child that outlives the installer's own process.
        result = await backend.run(
            "box",
            ["sh", "-c", "sleep 30 & echo started"],
            env={},
            cwd=None,
            timeout=30,
            output_limit=65536,
            network=True,
        )
        assert result.stdout.strip() == "started", result.stderr
        # Without bubblewrap there is no installer of its own to run.
        assert len(made) == (2 if use_bwrap else 1)
        assert not any(cgroup.exists() for cgroup in made[1:])
        await backend.run(
            "box",
            ["sh", "-c", "setsid sleep 30 >/dev/null 2>&1 &"],
            env={},
            cwd=None,
            timeout=30,
            output_limit=65536,
        )
        assert made[0].is_dir()
    finally:
        await backend.delete("box")
    for _ in range(100):
        if not made[0].exists():
            break
        await asyncio.sleep(0.02)
    assert not made[0].exists()


async def test_setup_retry_resumes_and_refuses_step_cut_short(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """A retried configure (its worker died) skips the steps that finished and
    does not run again a step that had started."""
    settings = Settings(data_dir=tmp_path / "data")
    commands = ["echo one >> log", "echo two >> log", "echo three >> log"]

    async def setup(key: str) -> str:
        return await runtime.apply_setup(
            backend,
            "box",
            template="base",
            packages=[],
            commands=commands,
            env={},
            settings=settings,
            progress_key=key,
        )

    log = backend.folder("box") / "log"
    await setup("first")
    assert log.read_text() == "one\ntwo\nthree\n"
    # Nothing stays behind of a setup that finished.
    assert not any((backend.folder("box") / ".nexus" / "calls").iterdir())

    progress = ".nexus/calls/setup-" + runtime._call_digest("second")
    log.unlink()
    # An attempt that finished step 1 and died before step 2 started.
    await backend.write_file("box", progress, b"1 1")
    output = await setup("second")
    assert log.read_text() == "two\nthree\n"
    assert "ran before the worker restarted" in output

    # An attempt that died while step 2 ran.
    log.unlink()
    await backend.write_file("box", progress, b"1 2")
    with pytest.raises(SandboxSetupError) as cut:
        await setup("second")
    assert "setup command 2 `echo two >> log` was cut short" in cut.value.failure
    assert cut.value.completed == ["setup command 1 `echo one >> log`"]
    assert not log.exists()
    # The refusal ends the call: the same key starts afresh next time.
    await setup("second")
    assert log.read_text() == "one\ntwo\nthree\n"


async def test_index_password_not_shown(backend: LocalBackend, tmp_path: Path) -> None:
    """The package index URL's password stays out of the setup's output and
    its error, where the installer's command line is shown."""
    password = "S3CP01pkgindexpw"
    settings = Settings(
        data_dir=tmp_path / "data",
        sandbox_package_index=f"http://pkguser:{password}@127.0.0.1:9/simple/",
    )
    with pytest.raises(SandboxSetupError) as failed:
        await runtime.apply_setup(
            backend,
            "box",
            template="python",
            packages=["nexus-no-such-package"],
            commands=[],
            env={},
            settings=settings,
        )
    shown = f"{failed.value} {failed.value.failure} {failed.value.output}"
    assert "--index-url http://pkguser:***@127.0.0.1:9/simple/" in shown
    assert password not in shown


@pytest.mark.parametrize("use_bwrap", ISOLATION_MODES)
async def test_disk_limit_stops_program(use_bwrap: bool, tmp_path: Path) -> None:
    """A program whose files grow past the sandbox's disk limit is stopped,
    where the per-file limit alone would let many files fill the disk."""
    limited = LocalBackend(
        tmp_path / "sandboxes",
        use_bwrap=use_bwrap,
        limits=ResourceLimits(disk_bytes=20 * 1024**2),
    )
    await limited.create("box", template="base", timeout=300, env={}, metadata={})
    code = (
        "import time\n"
        "for i in range(100):\n"
        "    with open(f'f{i}', 'wb') as out:\n"
        "        out.write(b'x' * 1024**2)\n"
        "    time.sleep(0.05)\n"
        "print('wrote all')\n"
    )
    try:
        result = await limited.run(
            "box",
            ["python3", "-c", code],
            env={},
            cwd=None,
            timeout=60,
            output_limit=65536,
        )
        assert result.exit_code is None, result
        assert "wrote all" not in result.stdout
        assert "took more than its disk limit of 20971520 bytes" in result.stderr
        written = list(limited.folder("box").glob("f*"))
        assert 20 <= len(written) < 100
        # Once the files are removed, the sandbox runs programs again.
        cleaned = await limited.run(
            "box",
            ["sh", "-c", "rm -f f*; echo clean"],
            env={},
            cwd=None,
            timeout=30,
            output_limit=65536,
        )
        assert cleaned.stdout == "clean\n"
        if use_bwrap:
            # /tmp is a tmpfs of its own, in memory, with the same bound.
            filled = await limited.run(
                "box",
                ["sh", "-c", "head -c 31457280 /dev/zero > /tmp/big; echo $?"],
                env={},
                cwd=None,
                timeout=30,
                output_limit=65536,
            )
            assert filled.stdout.strip() != "0", filled
            assert "No space left on device" in filled.stderr
    finally:
        await limited.delete("box")


async def test_disk_limit_named_in_setup_error(tmp_path: Path) -> None:
    """A setup command that the disk limit stops is blamed on the limit, not
    on a sandbox that ended."""
    limited = LocalBackend(
        tmp_path / "sandboxes", limits=ResourceLimits(disk_bytes=10 * 1024**2)
    )
    await limited.create("box", template="base", timeout=300, env={}, metadata={})
    command = (
        "for i in $(seq 60); do head -c 1000000 /dev/zero >> big; sleep 0.05; done"
    )
    try:
        with pytest.raises(SandboxSetupError) as failed:
            await runtime.apply_setup(
                limited,
                "box",
                template="base",
                packages=[],
                commands=[command],
                env={},
                settings=Settings(data_dir=tmp_path / "data"),
            )
        assert "was stopped because the sandbox's files took more than its disk" in (
            failed.value.failure
        )
    finally:
        await limited.delete("box")


@pytest.mark.parametrize(
    ("cut", "shown", "dropped"), [(3, "ab", 4), (4, "ab", 4), (5, "ab€", 1)]
)
def test_cut_inside_a_character_drops_it_whole(
    cut: int, shown: str, dropped: int
) -> None:
    """A cut inside a multi-byte character drops that character's first
    bytes too, and counts them, instead of showing U+FFFD."""
    data = "ab€x".encode()  # 6 bytes; the euro sign is bytes 2 to 4
    text, counted = _captured(bytearray(data[:cut]), len(data) - cut)
    assert text == f"{shown}\n[output truncated: {dropped} bytes dropped]"
    assert counted == dropped

"""Probes of the warm pair: what code in one execution can do to the next.

Each test runs sandbox code that finds the warm pair from inside (its own
supervisor's parent is the runner, and the runner's other child is the warm
supervisor), then checks the execution that takes that pair.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from app.sandbox.backend import RunOutput
from app.sandbox.local import LocalBackend

# Sandbox code that sets `warm_supervisors` and `warm_programs` to the pids
# of the pair that the runner forked for the next execution.
FIND_WARM_PAIR = """
import os, signal, time

def parent_of(pid):
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])

def children_of(parent):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if parent_of(int(name)) == parent:
                    found.append(int(name))
            except OSError:
                pass
    return found

own_supervisor = os.getppid()
runner = parent_of(own_supervisor)
# The runner forks the next pair right after handing this execution over.
for _ in range(200):
    warm_supervisors = [p for p in children_of(runner) if p != own_supervisor]
    warm_programs = [c for p in warm_supervisors for c in children_of(p)]
    if len(warm_supervisors) == 1 and len(warm_programs) == 1:
        break
    time.sleep(0.01)
assert len(warm_supervisors) == 1, warm_supervisors
assert len(warm_programs) == 1, warm_programs
"""

# Sandbox code that prints API_TOKEN from a `request` local of the runner's
# `serve` frame, where a program forked after a request would find it.
READ_SERVE_REQUEST = """
import sys
frame = sys._getframe()
while frame is not None:
    if frame.f_code.co_name == "serve":
        request = frame.f_locals.get("request") or {}
        print(request.get("env", {}).get("API_TOKEN"))
    frame = frame.f_back
"""


async def run_python(
    backend: LocalBackend, code: str, timeout: float = 10, **env: str
) -> RunOutput:
    return await backend.run(
        "box",
        ["python3", "-c", code],
        env=env,
        cwd=None,
        timeout=timeout,
        output_limit=65536,
    )


async def test_stopped_warm_supervisor_spares_next_run(
    backend: LocalBackend,
) -> None:
    stopper = await run_python(
        backend,
        FIND_WARM_PAIR + "os.kill(warm_supervisors[0], signal.SIGSTOP)\n",
    )
    assert stopper.exit_code == 0, stopper.stderr
    # The runner waits 2 s for the stopped supervisor's acknowledgement,
    # kills it (it has a copy of the host's connection) and runs the
    # request on a pair of its own.
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(
            run_python(backend, "print('after')", timeout=3), 15
        )
    except TimeoutError:
        pytest.fail("the execution after a stopped warm supervisor hung for 15 s")
    elapsed = time.monotonic() - started
    assert result.stdout == "after\n"
    assert result.timed_out is False, "a finished program was reported timed out"
    assert result.exit_code == 0
    assert elapsed < 5, f"the execution took {elapsed:.1f} s"


async def test_next_run_cannot_read_previous_env(backend: LocalBackend) -> None:
    first = await run_python(backend, "print('first')", API_TOKEN="first-run-secret")
    assert first.exit_code == 0, first.stderr
    await asyncio.sleep(0.2)
    second = await run_python(backend, READ_SERVE_REQUEST)
    assert second.exit_code == 0, second.stderr
    assert "first-run-secret" not in second.stdout, (
        "the warm program still has the previous request on its stack"
    )


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
async def test_warm_program_hit_alone_spares_next_run(
    backend: LocalBackend, signal_name: str
) -> None:
    hitter = await run_python(
        backend,
        FIND_WARM_PAIR + f"os.kill(warm_programs[0], signal.{signal_name})\n",
    )
    assert hitter.exit_code == 0, hitter.stderr
    result = await asyncio.wait_for(
        run_python(backend, "print('after')", timeout=3), 15
    )
    assert (result.stdout, result.exit_code, result.timed_out) == (
        "after\n",
        0,
        False,
    )


async def test_sandbox_code_has_no_capabilities(backend: LocalBackend) -> None:
    if backend.bwrap is None:
        pytest.skip("without bubblewrap code runs with the worker's privileges")
    # Run by root, bubblewrap would otherwise pass root's capabilities on.
    result = await run_python(
        backend,
        "print([l for l in open('/proc/self/status') if l.startswith('CapEff')][0])",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == ["CapEff:", "0000000000000000"]

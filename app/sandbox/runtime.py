"""Backend-independent sandbox work: choosing the backend, building commands
per language, applying packages and setup commands, redacting secrets."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import shlex
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from app.contracts.sandbox import (
    CUT_MARKER,
    NODE_TEMPLATES,
    RESULT_OUTPUT_LIMIT,
    ExecuteRequest,
    ExecuteResult,
    ExecutionStatus,
    encoded_size,
    fit_encoded,
)
from app.sandbox.backend import (
    DISK_LIMIT_NOTE,
    RunOutput,
    SandboxBackend,
    SandboxBackendError,
    SandboxConfigurationError,
    SandboxSetupError,
)
from app.secret_names import is_secret_name
from app.settings import Settings, mask_url_passwords, url_passwords

if TYPE_CHECKING:
    from app.sandbox.local import LocalBackend
    from app.sandbox.output_stream import ExecutionStream

logger = logging.getLogger(__name__)

# Code longer than this goes through a file, because Linux caps one argv
# string at 128 KiB.
_INLINE_CODE_LIMIT = 100_000
_SETUP_TIMEOUT = 600.0
REDACTED = "********"


@functools.cache
def _backend_for(
    kind: str,
    root: str,
    allow_network: bool,
    use_bwrap: bool | None,
    api_key: str,
    spares: int = 0,
    disk_bytes: int = 0,
) -> SandboxBackend:
    if kind == "e2b":
        from app.sandbox.e2b import E2BBackend

        return E2BBackend(api_key=api_key)
    from pathlib import Path

    from app.sandbox.local import LocalBackend, ResourceLimits

    local = LocalBackend(
        Path(root),
        use_bwrap=use_bwrap,
        allow_network=allow_network,
        spares=spares,
        limits=ResourceLimits(disk_bytes=disk_bytes),
    )
    _local_backends.append(local)
    return local


_local_backends: list[LocalBackend] = []


async def close_local_backends() -> None:
    """End the spare runners of this process's local backends.

    Sandboxes that sessions own keep running until their own end. A spare
    belongs to no session, so nothing else ends it before its timeout.
    """
    for local in _local_backends:
        await local.close()


def get_backend(settings: Settings) -> SandboxBackend:
    """Return the process-wide backend that `NEXUS_SANDBOX_BACKEND` selects.

    Raises:
        SandboxConfigurationError: `e2b` is selected but E2B_API_KEY is unset.
    """
    api_key = ""
    if settings.sandbox_backend == "e2b":
        if settings.e2b_api_key is None or not settings.e2b_api_key.get_secret_value():
            raise SandboxConfigurationError(
                "NEXUS_SANDBOX_BACKEND=e2b needs E2B_API_KEY; set it, or set "
                "NEXUS_SANDBOX_BACKEND=local"
            )
        api_key = settings.e2b_api_key.get_secret_value()
    return _backend_for(
        settings.sandbox_backend,
        str(settings.resolved_data_dir / "sandboxes"),
        settings.sandbox_allow_network,
        settings.sandbox_bwrap,
        api_key,
        settings.sandbox_spares,
        settings.sandbox_disk_limit,
    )


def code_command(language: str, code: str, code_path: str | None = None) -> list[str]:
    """Return the argv that runs `code` (or the file `code_path`) in `language`."""
    if language == "python":
        return ["python3", code_path] if code_path else ["python3", "-c", code]
    if language == "javascript":
        return ["node", code_path] if code_path else ["node", "-e", code]
    if language == "bash":
        return ["bash", code_path] if code_path else ["bash", "-c", code]
    raise ValueError(f"unknown language {language!r}; use python, javascript or bash")


_EXTENSIONS = {"python": "py", "javascript": "js", "bash": "sh"}


def package_env(home: str) -> dict[str, str]:
    """Variables that make installed packages importable in later executions."""
    return {
        "PYTHONPATH": f"{home}/.nexus/python",
        "NODE_PATH": f"{home}/node_modules",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def installer_env() -> dict[str, str]:
    """Variables of installers, which get none of the sandbox's env vars.

    Sandbox code can set what those name (PYTHONPATH, NODE_OPTIONS), and an
    installer runs with the network. `PIP_CONFIG_FILE=/dev/null` makes pip
    skip its config files, which lie in the sandbox folder.
    """
    return {
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_CONFIG_FILE": "/dev/null",
    }


# An npm package from the registry: `name` or `@scope/name`, each with an
# optional `@version`, range or tag.
_NPM_SPEC = re.compile(r"(@[^/@\s:\\]+/)?[^/@\s:\\.][^/@\s:\\]*(@[^/:\\]+)?")


# pip reads a requirement with one of these endings as a file to install.
_ARCHIVES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def package_problem(installer: str, spec: str) -> str | None:
    """Return why `spec` may not be installed, or None.

    An installer has the network, so it may fetch only from the package
    index and run no code of the packages. A URL, a git repository or (for
    pip) a folder would make it fetch from elsewhere or build a package from
    source, which runs the package's own code with the network.
    """
    if installer == "pip":
        if (
            any(mark in spec for mark in ("/", "\\", "@", ":"))
            or spec.startswith(".")
            or spec.lower().endswith(_ARCHIVES)
        ):
            return (
                "pip installs only requirements from the package index (such as "
                "requests or requests==2.32.3), not URLs, git repositories, "
                "folders or archive files"
            )
        return None
    # A folder's package.json can name URL dependencies, which npm would
    # fetch with the installer's network, so folders are refused too.
    if _NPM_SPEC.fullmatch(spec) is None:
        return (
            "npm installs only packages from the registry (such as lodash, "
            "lodash@4 or @scope/name@1.2.3), not folders, URLs, git "
            "repositories or GitHub shorthands"
        )
    return None


def split_packages(
    template: str, packages: Iterable[str]
) -> tuple[list[str], list[str]]:
    """Return the pip and the npm packages of `packages`. A `pip:` or `npm:`
    prefix picks the installer. Otherwise node templates use npm and every
    other template uses pip."""
    pip: list[str] = []
    npm: list[str] = []
    for package in packages:
        if package.startswith("pip:"):
            pip.append(package[4:])
        elif package.startswith("npm:"):
            npm.append(package[4:])
        elif template in NODE_TEMPLATES:
            npm.append(package)
        else:
            pip.append(package)
    return pip, npm


def install_command(
    template: str, packages: Iterable[str], index_url: str | None
) -> list[list[str]]:
    """Return the installer commands for `packages`.

    A `pip:` or `npm:` prefix picks the installer; otherwise node templates
    use npm and every other template uses pip (into `.nexus/python`).
    """
    pip, npm = split_packages(template, packages)
    commands: list[list[str]] = []
    # Installers get the network, which the sandbox's code may lack, so they
    # must run no code that the sandbox can write. `-I` keeps the sandbox
    # folder (the cwd), PYTHONPATH and the user site off pip's sys.path, so a
    # planted `sitecustomize.py` or `pip/` does not load. Without a cache,
    # pip takes no planted archive from `~/.cache/pip`.
    if pip:
        command = ["python3", "-I", "-m", "pip", "install", "--no-input"]
        command += ["--retries", "1", "--no-cache-dir"]
        command += ["--target", ".nexus/python", "--upgrade"]
        # Wheels only: building a source distribution runs its own code, and
        # the installer has the network.
        command += ["--only-binary", ":all:"]
        if index_url:
            command += ["--index-url", index_url]
        commands.append([*command, *pip])
    if npm:
        # Options on the command line take precedence over the `.npmrc` files
        # in the sandbox folder (project and user config). These are the
        # options of npm 11 that make an install run a program or preload
        # code. The cache is not the sandbox's `~/.npm`, which its code
        # could fill.
        command = ["npm", "install", "--no-audit", "--no-fund"]
        command += ["--userconfig", "/dev/null", "--script-shell", "/bin/sh"]
        command += ["--node-options=", "--git", "git"]
        command += ["--cache", "/tmp/nexus-npm-cache", "--install-links"]
        # npm writes its debug log under the cache, in the installer's
        # private /tmp, which is gone before anyone could read the path
        # that its error names. With no log, the error states that none
        # was written.
        command += ["--logs-max", "0"]
        # No lifecycle scripts (preinstall, install, postinstall): they are
        # the packages' own code, and the installer has the network.
        command += ["--ignore-scripts"]
        if index_url:
            command += ["--registry", index_url]
        commands.append([*command, *npm])
    return commands


# npm reads the `.npmrc`, `package.json` and lock file of the project it
# installs into, and any of them can name a registry, a proxy or a tarball
# URL. In the sandbox folder, sandbox code could write them and make an
# installer, which has the network, fetch from a host of its choosing. So
# npm installs into an empty folder of its own, and the packages are copied
# into the sandbox's `node_modules` afterwards.
_NPM_IN_SCRATCH = r"""
set -e
home=$1; shift
scratch=$(mktemp -d "${TMPDIR:-/tmp}/nexus-npm.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
"$@" --prefix "$scratch"
mkdir -p "$home/node_modules"
if [ -d "$scratch/node_modules" ]; then
  cp -a "$scratch/node_modules/." "$home/node_modules/"
fi
"""


def in_scratch_project(command: list[str], home: str) -> list[str]:
    """Wrap an `npm install` command so that it runs in an empty project and
    copies what it installed into `home`'s `node_modules`."""
    return ["bash", "-c", _NPM_IN_SCRATCH, "nexus-npm", home, *command]


# pip reads a requirement that names a file in its working folder (such as
# `pkg.tbz`) as that file, and builds it, which runs its code with the
# installer's network. So pip runs in an empty folder of its own, and
# installs into the sandbox by an absolute path.
_PIP_IN_SCRATCH = 'cd "$(mktemp -d)" || exit 1; exec "$@"'


def in_scratch_folder(command: list[str], home: str) -> list[str]:
    """Wrap a `pip install` command so that it runs in an empty folder and
    installs into `home`'s `.nexus/python`."""
    absolute = [
        f"{home}/{argument}" if argument == ".nexus/python" else argument
        for argument in command
    ]
    return ["sh", "-c", _PIP_IN_SCRATCH, "nexus-pip", *absolute]


async def apply_setup(
    backend: SandboxBackend,
    backend_id: str,
    *,
    template: str,
    packages: list[str],
    commands: list[str],
    env: Mapping[str, str],
    settings: Settings,
    command_names: Sequence[str] = (),
    lifetime: int | None = None,
    progress_key: str | None = None,
) -> str:
    """Install `packages`, then run `commands`, in the sandbox folder.

    Returns their combined output, secrets redacted.

    Args:
        command_names: what errors call each of `commands` ("the startup
            script"); a command without one is "setup command N" with its
            text.
        lifetime: the sandbox's timeout, counted from the start of setup,
            so that a step cut short by it is blamed on the timeout.
        progress_key: names a file in the sandbox that records the steps
            done and the step started, under a key that a retry of the same
            call repeats. A retry skips the steps done, and refuses to start
            a step that an earlier attempt started without finishing (its
            worker died), since a command may not be safe to run twice.

    Raises:
        SandboxSetupError: an installer or command failed or timed out, or
            an earlier attempt was cut short in the middle of a step. The
            steps before it ran, and their changes to the sandbox stay.
    """
    for installer, specs in zip(
        ("pip", "npm"), split_packages(template, packages), strict=True
    ):
        for spec in specs:
            problem = package_problem(installer, spec)
            if problem is not None:
                raise SandboxSetupError(
                    f"package {spec!r} cannot be installed: {problem}",
                    "",
                    [],
                    advice="Name the package as the index knows it.",
                )
    home = await backend.home(backend_id)
    full_env = {**package_env(home), **env}
    outputs: list[str] = []
    # Installers need the package index, so they get the network even where
    # the sandbox's own code has none; setup commands run like user code.
    # The index URL may carry a password, which neither the output nor the
    # errors may show.
    index_url = settings.sandbox_package_index
    secrets = [*secret_values(env), *url_passwords(index_url)]
    steps = [
        (
            f"the installer `{mask_url_passwords(shlex.join(argv))}`",
            mask_url_passwords(shlex.join(argv)),
            in_scratch_project(argv, home)
            if argv[0] == "npm"
            else in_scratch_folder(argv, home),
            True,
        )
        for argv in install_command(template, packages, index_url)
    ]
    for index, command in enumerate(commands):
        if index < len(command_names):
            name = command_names[index]
        else:
            name = f"setup command {index + 1} {quote_command(command)}"
        steps.append((name, command, ["bash", "-c", command], False))
    completed: list[str] = []
    progress = None
    done = 0
    if progress_key is not None:
        progress = f".nexus/calls/setup-{_call_digest(progress_key)}"
        done = await _resume_setup(backend, backend_id, progress, steps)
        completed = [name for name, *_ in steps[:done]]
    started = time.monotonic()
    for position, (name, command_text, argv, network) in enumerate(steps):
        if position < done:
            outputs.append(f"$ {command_text}\n(ran before the worker restarted)")
            continue
        if progress is not None:
            record = f"{position} {position + 1}".encode()
            await _write_nexus_file(backend, backend_id, progress, record)
        result = await backend.run(
            backend_id,
            argv,
            env=installer_env() if network else full_env,
            cwd=None,
            timeout=_SETUP_TIMEOUT,
            output_limit=settings.sandbox_output_limit,
            network=network,
        )
        text = redact(result.stdout + result.stderr, secrets)
        outputs.append(f"$ {command_text}\n{text}")
        if result.timed_out or result.exit_code != 0:
            if result.timed_out:
                outcome = f"timed out after {_SETUP_TIMEOUT:g} s"
            elif result.exit_code is not None:
                outcome = f"exited with code {result.exit_code}"
            elif DISK_LIMIT_NOTE in result.stderr:
                outcome = (
                    "was stopped because the sandbox's files took more than its "
                    "disk limit; remove files, or raise NEXUS_SANDBOX_DISK_LIMIT"
                )
            elif lifetime is not None and time.monotonic() - started >= lifetime - 1:
                outcome = (
                    f"was cut short when the sandbox reached its timeout of "
                    f"{lifetime} s, which counts setup too; give a timeout "
                    "longer than the setup takes"
                )
                # The runner's own note promises a recreation, which a
                # sandbox that ended during its setup does not get.
                text = _RUNNER_NOTE.sub("", text)
            else:
                outcome = "was cut short: the sandbox ended while it ran"
            if progress is not None:
                # A failed step ends the call: nothing is left to resume.
                await _remove_code_file(backend, backend_id, progress)
            raise SandboxSetupError(f"{name} {outcome}", text, completed)
        completed.append(name)
        if progress is not None:
            record = f"{position + 1} {position + 1}".encode()
            await _write_nexus_file(backend, backend_id, progress, record)
    if progress is not None:
        await _remove_code_file(backend, backend_id, progress)
    return "\n".join(outputs)


async def _resume_setup(
    backend: SandboxBackend,
    backend_id: str,
    progress: str,
    steps: Sequence[tuple[str, str, list[str], bool]],
) -> int:
    """Return how many steps an earlier attempt finished, from its progress
    file ("DONE STARTED"); raise when it started one it did not finish."""
    recorded = await backend.read_file(backend_id, progress, 64)
    try:
        done, begun = (int(part) for part in (recorded or b"0 0").split())
    except ValueError:
        return 0  # not ours: code in the sandbox put something else there
    if not 0 <= done <= begun <= len(steps):
        return 0
    if begun > done:
        name = steps[begun - 1][0]
        completed = [step[0] for step in steps[: begun - 1]]
        await _remove_code_file(backend, backend_id, progress)
        raise SandboxSetupError(
            f"{name} was cut short when the worker that ran it stopped, and "
            "is not run again because it may have run in part",
            "",
            completed,
        )
    return done


def quote_command(command: str, limit: int = 120) -> str:
    """Return `command` in backticks for a message, cut to its first line
    and `limit` characters."""
    line = command.strip().splitlines()[0] if command.strip() else ""
    if len(line) > limit or line != command.strip():
        line = line[:limit] + "..."
    return f"`{line}`"


async def execute(
    backend: SandboxBackend,
    backend_id: str,
    request: ExecuteRequest,
    env: Mapping[str, str],
    settings: Settings,
    keep_alive: int | None = None,
    stream: ExecutionStream | None = None,
    settled_call_ids: Sequence[str] = (),
) -> ExecuteResult:
    """Run `request.code` with `env` and return measured, redacted output.

    The output masks the values of secret-named env vars (see
    `secret_values`) and of the env vars that `request.mask_env` names.

    `keep_alive` extends the sandbox's life first (see `SandboxBackend.run`).
    `stream` gets the output while the program runs, and is closed before
    this returns or raises (its last chunks are then being written).
    `settled_call_ids` name calls whose results are recorded, whose start
    counts are removed first. A call's own count stays after its program
    ended: the result is not recorded until the caller's workflow task
    completes, and a worker that dies before that makes the call again.
    """
    for settled in settled_call_ids:
        await _remove_code_file(backend, backend_id, _counter_name(settled))
    try:
        return await _execute(
            backend, backend_id, request, env, settings, keep_alive, stream
        )
    except BaseException as error:
        if stream is not None:
            stream.fail(error)
        raise
    finally:
        if stream is not None:
            await stream.close()


async def _execute(
    backend: SandboxBackend,
    backend_id: str,
    request: ExecuteRequest,
    env: Mapping[str, str],
    settings: Settings,
    keep_alive: int | None,
    stream: ExecutionStream | None,
) -> ExecuteResult:
    home = await backend.home(backend_id)
    code_name = None
    code_path = None
    if len(request.code.encode()) > _INLINE_CODE_LIMIT:
        # A name of its own per execution, so that removing the file cannot
        # take it from a concurrent execution of the same program.
        code_name = f".nexus/code-{uuid.uuid4().hex}.{_EXTENSIONS[request.language]}"
        code_path = await _write_nexus_file(
            backend, backend_id, code_name, request.code.encode()
        )
    argv = code_command(request.language, request.code, code_path)
    inputs: list[str] = []
    runs = 1
    try:
        if request.call_id is not None:
            runs = await _count_start(backend, backend_id, request.call_id)
        file_env = await _write_input_files(backend, backend_id, request, inputs)
        if stream is not None:
            stream.start(runs)
        output: RunOutput = await backend.run(
            backend_id,
            argv,
            env={**package_env(home), **env, **file_env},
            cwd=request.working_dir,
            timeout=request.timeout,
            output_limit=settings.sandbox_output_limit,
            capture_output=request.capture_output,
            keep_alive=keep_alive,
            on_output=(
                stream.feed if stream is not None and backend.live_output else None
            ),
        )
        status = _status(output)
        if stream is not None:
            stream.finish(output, status)
    finally:
        for name in [code_name, *inputs]:
            if name is not None:
                await _remove_code_file(backend, backend_id, name)
    secrets = masked_values(env, request)
    stdout, stdout_dropped = redact(output.stdout, secrets), output.stdout_dropped_bytes
    stderr, stderr_dropped = redact(output.stderr, secrets), output.stderr_dropped_bytes
    stdout_budget, stderr_budget = split_output_budget(
        encoded_size(stdout), encoded_size(stderr), RESULT_OUTPUT_LIMIT
    )
    stdout, stdout_dropped = fit_output(stdout, stdout_dropped, stdout_budget)
    stderr, stderr_dropped = fit_output(stderr, stderr_dropped, stderr_budget)
    return ExecuteResult(
        stdout=stdout,
        stderr=stderr,
        exit_code=output.exit_code,
        status=status,
        execution_time=round(output.execution_time, 6),
        stdout_dropped_bytes=stdout_dropped,
        stderr_dropped_bytes=stderr_dropped,
        runs=runs,
    )


def split_output_budget(stdout: int, stderr: int, limit: int) -> tuple[int, int]:
    """Share `limit` encoded bytes between the two streams of a result: each
    gets half, and a stream that needs less than half leaves the rest to the
    other."""
    half = limit // 2
    if stdout <= half:
        return stdout, limit - stdout
    if stderr <= half:
        return limit - stderr, stderr
    return half, limit - half


def fit_output(text: str, dropped: int, limit: int) -> tuple[str, int]:
    """Cut one stream of a result so that its JSON encoding takes at most
    `limit` bytes, and return it with its count of dropped bytes.

    The output limit counts raw bytes, but a control character takes 6 bytes
    in JSON and the result must fit in one Temporal payload. The cut ends
    with the usual truncation marker, whose count adds the UTF-8 bytes cut
    here to those that the output limit dropped already.
    """
    if encoded_size(text) <= limit:
        return text, dropped
    marker = CUT_MARKER.search(text)
    if marker is not None:
        text = text[: marker.start()]
    # The marker with the largest count it can get, less its quotes, which
    # the kept text's encoding counts already.
    most = dropped + len(text.encode())
    marker_size = encoded_size(f"\n[output truncated: {most} bytes dropped]") - 2
    kept = fit_encoded(text, max(limit - marker_size, 2))
    dropped += len(text[len(kept) :].encode())
    return f"{kept}\n[output truncated: {dropped} bytes dropped]", dropped


def _status(output: RunOutput) -> ExecutionStatus:
    if output.timed_out:
        return "timed_out"
    if output.exit_code == 0:
        return "completed"
    return "failed"


async def _count_start(backend: SandboxBackend, backend_id: str, call_id: str) -> int:
    """Count one more start of the program of `call_id` in a file of the
    sandbox. Return the starts so far, this one included."""
    name = _counter_name(call_id)
    try:
        previous = await backend.read_file(backend_id, name, 32)
        starts = int(previous or b"0")
    except ValueError:
        starts = 0  # not ours: code in the sandbox put something else there
    await _write_nexus_file(backend, backend_id, name, str(starts + 1).encode())
    return starts + 1


async def _write_input_files(
    backend: SandboxBackend,
    backend_id: str,
    request: ExecuteRequest,
    written: list[str],
) -> dict[str, str]:
    """Write each `file_env` value to a file of this execution; return the
    variables that name them. Each name written is appended to `written`,
    so the caller removes even the files of a write that failed halfway."""
    # Files directly in `.nexus`, since removing a file leaves its folder.
    # A call made again (its worker died) writes the same names, so the
    # files of the start cut short go with this one's.
    if request.call_id is not None:
        prefix = f".nexus/input-{_call_digest(request.call_id)}"
    else:
        prefix = f".nexus/input-{uuid.uuid4().hex}"
    paths: dict[str, str] = {}
    for variable, content in request.file_env.items():
        name = f"{prefix}-{variable}"
        written.append(name)
        paths[variable] = await _write_nexus_file(
            backend, backend_id, name, content.encode()
        )
    return paths


def _counter_name(call_id: str) -> str:
    return f".nexus/calls/{_call_digest(call_id)}"


def _call_digest(call_id: str) -> str:
    return hashlib.sha256(call_id.encode()).hexdigest()[:32]


async def _write_nexus_file(
    backend: SandboxBackend, backend_id: str, name: str, content: bytes
) -> str:
    """Write a file of the platform under `.nexus/` in the sandbox.

    Code in the sandbox may have put a file or a symlink where the `.nexus`
    folder goes. The platform owns that name, so such an entry is removed
    and the write tried once more, rather than every later call failing.
    """
    try:
        return await backend.write_file(backend_id, name, content)
    except ValueError:
        folders = name.split("/")[:-1]
        for depth in range(1, len(folders) + 1):
            with contextlib.suppress(OSError, ValueError, SandboxBackendError):
                await backend.remove_file(backend_id, "/".join(folders[:depth]))
        return await backend.write_file(backend_id, name, content)


async def _remove_code_file(
    backend: SandboxBackend, backend_id: str, code_name: str
) -> None:
    """Remove an execution's program or input file; a failure costs only
    disk space."""
    try:
        await backend.remove_file(backend_id, code_name)
    except (SandboxBackendError, OSError, ValueError) as error:
        logger.warning(
            "could not remove program file %s of sandbox %s: %s",
            code_name,
            backend_id,
            error,
        )


def secret_values(env: Mapping[str, str]) -> list[str]:
    """Return the values of env vars whose names mark them as secrets, by the
    rule that the audit log uses for argument names."""
    return [value for name, value in env.items() if is_secret_name(name)]


def masked_values(env: Mapping[str, str], request: ExecuteRequest) -> list[str]:
    """Return the env var values that an execution's output masks: the
    secret-named ones, and those of the env vars that `request.mask_env`
    names, because a workflow step's env vars are secrets whatever their
    names. The output goes into the session's history, logs and stream."""
    return secret_values(env) + [env[name] for name in request.mask_env if name in env]


# The note that the local backend adds to the output of an execution whose
# runner ended.
_RUNNER_NOTE = re.compile(r"\n\[sandbox runner failed during this execution: [^\]]*\]")
# The marker that a backend puts where it cut a stream at the output limit.
_CUT_MARKER = re.compile(r"\n\[output truncated: \d+ bytes dropped\]")


# Lines of a multi-line secret shorter than this are not masked on their own,
# because short lines (`}`, `-----`, an indented blank) also appear in
# ordinary output, and masking them would garble it.
SECRET_LINE_MIN_CHARS = 8


def with_secret_lines(secrets: Iterable[str]) -> list[str]:
    """Return `secrets` followed by each line of every multi-line secret, with
    surrounding whitespace stripped, that has `SECRET_LINE_MIN_CHARS` or
    more characters. A program that prints a PEM key line by line, or with
    other line ends, then shows none of its lines."""
    whole = list(secrets)
    lines = [
        line.strip()
        for secret in whole
        for line in secret.splitlines()
        if len(line.strip()) >= SECRET_LINE_MIN_CHARS
    ]
    return whole + [line for line in lines if line not in whole]


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret value of 4 or more characters in `text`, and each
    line of a multi-line one (see `with_secret_lines`). Also replace the
    start of a secret value or line that the output limit cut off."""
    candidates = set(with_secret_lines(secrets))
    ordered = [s for s in sorted(candidates, key=len, reverse=True) if len(s) >= 4]
    for secret in ordered:
        text = text.replace(secret, REDACTED)
    if not ordered or "[output truncated: " not in text:
        return text
    pieces: list[str] = []
    start = 0
    for marker in _CUT_MARKER.finditer(text):
        pieces.append(_mask_cut_secret(text[start : marker.start()], ordered))
        pieces.append(marker.group())
        start = marker.end()
    pieces.append(text[start:])
    return "".join(pieces)


def _mask_cut_secret(text: str, secrets: list[str]) -> str:
    """Replace the end of `text` where it is the start of a secret: the rest
    of that secret was cut off with the output after it. A cut inside a
    character leaves U+FFFD there, which counts as part of the secret."""
    kept = text.rstrip("\ufffd")
    cut_inside = len(kept) < len(text)
    longest = 0
    for secret in secrets:
        for length in range(min(len(secret) - 1, len(kept)), longest, -1):
            if kept.endswith(secret[:length]):
                longest = length
                break
    if longest:
        return kept[: len(kept) - longest] + REDACTED
    if cut_inside and any(len(secret[0].encode()) > 1 for secret in secrets):
        # A secret whose first character was cut: only the replacement
        # characters are left of it.
        return kept + REDACTED
    return text

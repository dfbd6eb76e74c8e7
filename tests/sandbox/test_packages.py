"""A successful `install_packages`, for real and without the internet: pip
in the sandbox installs a wheel built here from a package index served on
127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.tools import ToolContext, ToolError, invoke_tool
from tests.support.sandboxes import sandbox_test_settings


def build_wheel(folder: Path, name: str, version: str, module: str) -> Path:
    """Write a pure-Python wheel holding `<name>.py` with `module` as source."""
    distribution = name.replace("-", "_")
    wheel = folder / f"{distribution}-{version}-py3-none-any.whl"
    info = f"{distribution}-{version}.dist-info"
    files = {
        f"{distribution}.py": module,
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ),
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: nexus-test\n"
            "Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{path},sha256={encoded},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture
def package_index(tmp_path: Path) -> Iterator[str]:
    """A PEP 503 simple index on 127.0.0.1 with one package."""
    root = tmp_path / "index"
    project = root / "simple" / "nexus-demo-pkg"
    project.mkdir(parents=True)
    wheel = build_wheel(
        project, "nexus-demo-pkg", "1.0", "VALUE = 'installed from the local index'\n"
    )
    (project / "index.html").write_text(
        f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>'
    )

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def sandbox_settings(
    tmp_path: Path, temporal_address: str, package_index: str
) -> Settings:
    return sandbox_test_settings(
        tmp_path, temporal_address, sandbox_package_index=package_index
    )


IMPORT = "import nexus_demo_pkg; print(nexus_demo_pkg.VALUE)"


async def test_install_packages_from_local_index(tool_ctx: ToolContext) -> None:
    created = await invoke_tool(
        tool_ctx,
        "sandbox_create",
        {"template": "python", "install_packages": ["nexus-demo-pkg"]},
    )
    sandbox_id = created["sandbox_id"]
    try:
        assert created["install_packages"] == ["nexus-demo-pkg"]
        result = await invoke_tool(
            tool_ctx, "sandbox_execute", {"sandbox_id": sandbox_id, "code": IMPORT}
        )
        assert result["status"] == "completed", result
        assert result["stdout"] == "installed from the local index\n"
        logs = await invoke_tool(tool_ctx, "sandbox_logs", {"sandbox_id": sandbox_id})
        assert any("pip install" in line for line in logs["lines"]), logs
    finally:
        await invoke_tool(tool_ctx, "sandbox_delete", {"sandbox_id": sandbox_id})


async def test_configure_installs_and_recreation_reinstalls(
    tool_ctx: ToolContext,
) -> None:
    import shutil

    created = await invoke_tool(tool_ctx, "sandbox_create", {"template": "python"})
    sandbox_id = created["sandbox_id"]
    try:
        before = await invoke_tool(
            tool_ctx, "sandbox_execute", {"sandbox_id": sandbox_id, "code": IMPORT}
        )
        assert before["status"] == "failed"
        assert "ModuleNotFoundError" in before["stderr"]
        configured = await invoke_tool(
            tool_ctx,
            "sandbox_configure",
            {"sandbox_id": sandbox_id, "install_packages": ["nexus-demo-pkg"]},
        )
        assert configured["install_packages"] == ["nexus-demo-pkg"]
        after = await invoke_tool(
            tool_ctx, "sandbox_execute", {"sandbox_id": sandbox_id, "code": IMPORT}
        )
        assert after["stdout"] == "installed from the local index\n", after
        # A lost sandbox comes back with the configured package installed.
        status = await invoke_tool(
            tool_ctx, "sandbox_status", {"sandbox_id": sandbox_id}
        )
        home = (
            tool_ctx.settings.resolved_data_dir
            / "sandboxes"
            / status["backend_id"]
            / "home"
        )
        shutil.rmtree(home)
        again = await invoke_tool(
            tool_ctx, "sandbox_execute", {"sandbox_id": sandbox_id, "code": IMPORT}
        )
        assert again["recreated"] == 1
        assert again["stdout"] == "installed from the local index\n", again
    finally:
        await invoke_tool(tool_ctx, "sandbox_delete", {"sandbox_id": sandbox_id})


async def test_installers_build_nothing_from_source(
    tool_ctx: ToolContext, package_index: str
) -> None:
    """pip takes wheels only, and a folder for pip is refused before any
    installer runs: building a package runs its own code, with the network."""
    with pytest.raises(ToolError) as refused:
        await invoke_tool(
            tool_ctx,
            "sandbox_create",
            {"template": "python", "install_packages": ["./pkg"]},
        )
    # Neither installer takes a folder, so the item fails validation.
    assert "package './pkg' cannot be installed" in refused.value.message
    assert "not folders" in refused.value.message
    listed = await invoke_tool(tool_ctx, "sandbox_list", {"status": "running"})
    assert listed["sandboxes"] == []
    from app.sandbox.runtime import install_command

    [pip] = install_command("python", ["requests"], package_index)
    assert pip[pip.index("--only-binary") + 1] == ":all:"
    [npm] = install_command("node", ["lodash"], package_index)
    assert "--ignore-scripts" in npm


async def test_pip_builds_no_planted_archive(
    tool_ctx: ToolContext, tmp_path: Path
) -> None:
    """An item that names an archive that sandbox code wrote into the sandbox
    folder is not built: pip runs in an empty folder of its own."""
    import io
    import tarfile

    backend_code = (
        "import pathlib\n"
        "for home in ('/home/user', '.'):\n"
        "    try:\n"
        "        pathlib.Path(home, 'BUILT').write_text('x')\n"
        "    except OSError:\n"
        "        pass\n"
        "def get_requires_for_build_wheel(config=None):\n"
        "    return []\n"
    )
    files = {
        "evil/pyproject.toml": (
            '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
            'backend-path = ["."]\n'
        ),
        "evil/backend.py": backend_code,
    }
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:bz2") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    created = await invoke_tool(tool_ctx, "sandbox_create", {"template": "python"})
    sandbox_id = created["sandbox_id"]
    try:
        encoded = base64.b64encode(archive.getvalue()).decode()
        await invoke_tool(
            tool_ctx,
            "sandbox_execute",
            {
                "sandbox_id": sandbox_id,
                "code": (
                    "import base64, pathlib\n"
                    f"pathlib.Path('evil.tbz').write_bytes(base64.b64decode('{encoded}'))"
                ),
            },
        )
        with pytest.raises(ToolError) as failed:
            await invoke_tool(
                tool_ctx,
                "sandbox_configure",
                {"sandbox_id": sandbox_id, "install_packages": ["evil.tbz"]},
            )
        assert "looks like a filename, but the file does not exist" in (
            failed.value.message
        )
        assert "Preparing metadata" not in failed.value.message
        listed = await invoke_tool(
            tool_ctx,
            "sandbox_execute",
            {
                "sandbox_id": sandbox_id,
                "code": "import os; print(os.path.exists('BUILT'))",
            },
        )
        assert listed["stdout"] == "False\n"
    finally:
        await invoke_tool(tool_ctx, "sandbox_delete", {"sandbox_id": sandbox_id})


async def test_unprefixed_package_error_names_both(tool_ctx: ToolContext) -> None:
    with pytest.raises(ToolError) as refused:
        await invoke_tool(
            tool_ctx,
            "sandbox_create",
            {"template": "python", "install_packages": ["https://evil/x.whl"]},
        )
    message = refused.value.message
    assert "package 'https://evil/x.whl' cannot be installed" in message
    assert "pip installs only requirements from the package index" in message
    assert "npm installs only packages from the registry" in message
    with pytest.raises(ToolError) as prefixed:
        await invoke_tool(
            tool_ctx,
            "sandbox_create",
            {"template": "python", "install_packages": ["pip:https://evil/x.whl"]},
        )
    assert "npm" not in prefixed.value.message


async def test_npm_failure_names_no_lost_log(tool_ctx: ToolContext) -> None:
    # The test settings point the installers at a closed local port.
    with pytest.raises(ToolError) as failure:
        await invoke_tool(
            tool_ctx,
            "sandbox_create",
            {"template": "node", "install_packages": ["lodash"]},
        )
    message = failure.value.message
    assert "npm install" in message
    assert "A complete log of this run can be found in" not in message
    assert "Log files were not written" in message

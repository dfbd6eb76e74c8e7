import socket
from pathlib import Path

import pytest

from app.settings import Settings
from app.temporal.devserver import EmbeddedServerError, EmbeddedTemporal
from tests.support.postgres import free_port


async def test_port_held_by_other_process_is_rejected(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = Settings(
            data_dir=tmp_path, temporal_port=port, temporal_ui_port=free_port()
        )
        with pytest.raises(EmbeddedServerError) as caught:
            await EmbeddedTemporal(settings).start()
    assert f"port {port}" in str(caught.value)
    assert "not a Temporal server" in str(caught.value)
    assert not (tmp_path / "temporal.db").exists()


async def test_running_server_is_reused(tmp_path: Path, temporal_address: str) -> None:
    port = int(temporal_address.rsplit(":", 1)[1])
    settings = Settings(data_dir=tmp_path, temporal_port=port)
    server = EmbeddedTemporal(settings)
    assert await server.start() == f"127.0.0.1:{port}"
    assert server.reused
    assert server.process is None
    # A plain server records no web UI, so `nexus up` prints none.
    assert server.reused_ui_url is None
    server.stop()  # a reused server is left running


async def test_other_folders_server_is_rejected(tmp_path: Path) -> None:
    owner_dir = (tmp_path / "a").resolve()
    owner = Settings(
        data_dir=owner_dir, temporal_port=free_port(), temporal_ui_port=free_port()
    )
    server = EmbeddedTemporal(owner)
    await server.start()
    try:
        # The same folder reuses its own server and finds its web UI.
        same = EmbeddedTemporal(
            owner.model_copy(update={"temporal_ui_port": free_port()})
        )
        assert await same.start() == server.address
        assert same.reused
        assert same.reused_ui_url == server.ui_url

        other_dir = tmp_path / "b"
        other = EmbeddedTemporal(
            Settings(
                data_dir=other_dir,
                temporal_port=owner.temporal_port,
                temporal_ui_port=free_port(),
            )
        )
        with pytest.raises(EmbeddedServerError) as caught:
            await other.check_startable()
        message = str(caught.value)
        assert f"the Temporal server on port {owner.temporal_port}" in message
        assert f"embedded server of the data folder {owner_dir}" in message
        assert "NEXUS_TEMPORAL_PORT" in message
        assert f"NEXUS_DATA_DIR={owner_dir}" in message
        assert not other_dir.exists()
    finally:
        server.stop()


async def test_second_server_on_one_history_is_rejected(tmp_path: Path) -> None:
    """A second server on other ports over the same history (`nexus server`
    beside `nexus up`) is rejected before it starts. Once the first server
    stops, the history is free again."""
    first = EmbeddedTemporal(
        Settings(
            data_dir=tmp_path, temporal_port=free_port(), temporal_ui_port=free_port()
        )
    )
    await first.start()
    second = EmbeddedTemporal(
        Settings(
            data_dir=tmp_path, temporal_port=free_port(), temporal_ui_port=free_port()
        )
    )
    try:
        with pytest.raises(EmbeddedServerError) as caught:
            await second.start()
        message = str(caught.value)
        assert f"the Temporal history {tmp_path / 'temporal.db'} is in use" in message
        assert f"at {first.address}" in message
        assert "NEXUS_TEMPORAL_PORT" in message
        assert second.process is None
    finally:
        first.stop()
    try:
        assert await second.start() == second.address
        assert not second.reused
    finally:
        second.stop()

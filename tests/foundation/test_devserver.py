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
    server.stop()  # a reused server is left running

import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import (
    Settings,
    get_settings,
    settings_error_lines,
    unknown_variable_lines,
)


def test_defaults_use_embedded_server_and_sqlite(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.embedded
    assert settings.effective_temporal_address == "127.0.0.1:7233"
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'nexus.db'}"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("database_url", "mysql://db/x", "'mysql'"),
        ("database_url", "not a url", "not a database URL"),
        ("database_url", "postgresql+psycopg://u@h:5432", "names no database"),
        ("temporal_address", "localhost", "'localhost' is not host:port"),
        ("temporal_address", "localhost:99999", "between 1 and 65535"),
        ("http_port", 70000, "less than or equal to 65535"),
        ("temporal_port", 0, "greater than or equal to 1"),
    ],
)
def test_invalid_setting_names_field(field: str, value: object, expected: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**{field: value})
    error = caught.value.errors()[0]
    assert error["loc"] == (field,)
    assert expected in error["msg"]


def test_postgres_scheme_is_normalized() -> None:
    settings = Settings(database_url="postgres://u:p@127.0.0.1:5432/nexus")
    assert settings.effective_database_url == (
        "postgresql+psycopg://u:p@127.0.0.1:5432/nexus"
    )


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXUS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NEXUS_LOG_LEVEL", "debug")
    monkeypatch.setenv("E2B_API_KEY", "e2b-secret")
    settings = Settings()
    assert settings.resolved_data_dir == tmp_path
    assert settings.log_level == "DEBUG"
    assert settings.e2b_api_key is not None


def test_masked_hides_secrets_and_password() -> None:
    settings = Settings(
        database_url="postgresql+psycopg://nexus:hunter2@127.0.0.1:5432/nexus",
        encryption_key="top-secret-key",  # type: ignore[arg-type]
        anthropic_api_key="sk-ant-secret",  # type: ignore[arg-type]
        sandbox_package_index="https://pkg:index-pass@127.0.0.1:3141/simple",
    )
    masked = settings.masked()
    text = repr(masked)
    assert "hunter2" not in text
    assert "index-pass" not in text
    assert masked["sandbox_package_index"] == "https://pkg:***@127.0.0.1:3141/simple"
    assert "top-secret-key" not in text
    assert "sk-ant-secret" not in text
    assert masked["encryption_key"] == "********"
    assert masked["e2b_api_key"] is None


def test_masked_hides_query_credentials() -> None:
    settings = Settings(
        database_url="postgresql+psycopg://nexus@127.0.0.1:5432/nx?password=pg-pw"
        "&sslpassword=ssl-pw&sslmode=require",
        sandbox_package_index="http://127.0.0.1:9/simple?token=idx-token",
        anthropic_base_url="http://127.0.0.1:9/?x=1&api_key=base-key",
    )
    masked = settings.masked()
    text = repr(masked)
    for secret in ["pg-pw", "ssl-pw", "idx-token", "base-key"]:
        assert secret not in text
    assert "password=***" in masked["database_url"]
    assert "sslpassword=***" in masked["database_url"]
    assert "sslmode=require" in masked["database_url"]
    assert masked["sandbox_package_index"] == "http://127.0.0.1:9/simple?token=***"
    assert masked["anthropic_base_url"] == "http://127.0.0.1:9/?x=1&api_key=***"


def test_masked_hides_password_with_at() -> None:
    settings = Settings(database_url="postgresql+psycopg://u:pw@part@127.0.0.1:9/db")
    masked = settings.masked()["database_url"]
    assert masked == "postgresql+psycopg://u:***@127.0.0.1:9/db"


def _error_lines(**values: object) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    return settings_error_lines(caught.value)


def test_error_lines_name_variable_value_and_default() -> None:
    (line,) = _error_lines(sandbox_backend="docker")
    assert line == (
        "invalid setting NEXUS_SANDBOX_BACKEND='docker': Input should be 'local' "
        "or 'e2b'; set an accepted value, or unset NEXUS_SANDBOX_BACKEND for the "
        "default 'local'"
    )
    # A validator of its own already names the variable and the value.
    (line,) = _error_lines(temporal_address="localhost")
    assert line.startswith("invalid setting: NEXUS_TEMPORAL_ADDRESS='localhost' ")


def test_error_lines_hide_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", "placeholder")
    lines = _error_lines(
        encryption_key=12345,
        e2b_api_key=67890,
        database_url="postgresql+psycopg://nexus:hunter2@127.0.0.1:5432",
        sandbox_package_index=["https://u:tok3n@index.example/simple"],
    )
    text = "\n".join(lines)
    assert "12345" not in text
    assert "67890" not in text
    assert "hunter2" not in text
    assert "tok3n" not in text
    assert "NEXUS_ENCRYPTION_KEY=(hidden: a secret)" in text
    assert "E2B_API_KEY=(hidden: a secret)" in text
    assert "NEXUS_DATABASE_URL='postgresql+psycopg://nexus:***@127.0.0.1:5432'" in text
    assert "NEXUS_SANDBOX_PACKAGE_INDEX=" in text


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("postgresql+psycopg://u:hunter2@127.0.0.1:abc/db", "abc"),
        (
            "postgresql+psycopg://u:hunter2@127.0.0.1:5432,127.0.0.1:5433/db",
            "5432,127.0.0.1:5433",
        ),
    ],
)
def test_error_lines_name_invalid_port(url: str, port: str) -> None:
    (line,) = _error_lines(database_url=url)
    assert "hunter2" not in line
    assert line.startswith("invalid setting: NEXUS_DATABASE_URL='")
    assert f"has an invalid port {port!r}" in line
    assert "postgresql+psycopg://user:password@host:5432/name" in line


def test_error_lines_mask_url_credentials() -> None:
    (line,) = _error_lines(anthropic_max_tokens="https://u:tok3n@host.example")
    assert "tok3n" not in line
    assert "'https://u:***@host.example'" in line


def test_unknown_variables_named_with_closest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in list(os.environ):
        if name.upper().startswith("NEXUS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NEXUS_API_PORT", "3001")
    monkeypatch.setenv("NEXUS_DATADIR", "/tmp/elsewhere")
    monkeypatch.setenv("NEXUS_FOO", "1")
    monkeypatch.setenv("NEXUS_E2B_API_KEY", "known-alias")
    with caplog.at_level(logging.WARNING, logger="app.settings"):
        settings = get_settings()
    assert settings.http_port == 3000
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        "unknown setting NEXUS_API_PORT is ignored; did you mean NEXUS_HTTP_PORT? "
        "(`nexus config` shows the settings)",
        "unknown setting NEXUS_DATADIR is ignored; did you mean NEXUS_DATA_DIR? "
        "(`nexus config` shows the settings)",
        "unknown setting NEXUS_FOO is ignored (`nexus config` shows the settings)",
    ]


def test_known_variables_not_reported() -> None:
    environ = {
        "NEXUS_HTTP_PORT": "3000",
        "nexus_log_level": "info",
        "NEXUS_ANTHROPIC_API_KEY": "x",
        "NEXUS_TEST_DATABASE_URL": "postgresql://127.0.0.1/x",
        "PATH": "/bin",
    }
    assert unknown_variable_lines(environ) == []


def test_data_folder_kept_private(tmp_path: Path) -> None:
    """A data folder is made for its owner only, and an existing one loses
    group and other access."""
    from app.settings import keep_private

    new = tmp_path / "new" / "data"
    keep_private(new)
    assert new.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    keep_private(shared)
    assert shared.stat().st_mode & 0o777 == 0o700

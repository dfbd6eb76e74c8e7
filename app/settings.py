"""Process settings, read from `NEXUS_*` environment variables."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from app.suggest import did_you_mean
from workers.allocator import DEFAULT_SETTING, parse_allocator_setting

logger = logging.getLogger(__name__)

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

_DATABASE_SCHEMES = {
    "sqlite": "sqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


class Settings(BaseSettings):
    """Effective configuration of one flow-nexus process.

    Capabilities add their own fields here, so `nexus config` shows everything
    that can be set in one place.
    """

    # No setting means anything as infinite: `inf` for a cache time would
    # keep a revoked key working in a running server.
    model_config = SettingsConfigDict(
        env_prefix="NEXUS_", extra="ignore", validate_default=True, allow_inf_nan=False
    )

    data_dir: Path = Field(
        Path(".nexus"), description="Folder for the databases, keys and storage."
    )
    temporal_address: str | None = Field(
        None,
        description="host:port of a Temporal frontend; unset runs the embedded server.",
    )
    temporal_port: int = Field(
        7233, ge=1, le=65535, description="gRPC port of the embedded server."
    )
    temporal_ui_port: int = Field(
        8233, ge=1, le=65535, description="Web UI port of the embedded server."
    )
    namespace: str = Field("default", min_length=1)
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; unset means a SQLite file in the data folder.",
    )
    log_level: LogLevel = "INFO"
    http_host: str = "127.0.0.1"
    http_port: int = Field(3000, ge=1, le=65535)
    sandbox_backend: Literal["local", "e2b"] = "local"
    sandbox_bwrap: bool | None = Field(
        None,
        description="Run local sandbox code under bubblewrap: unset uses it when "
        "`bwrap` is installed, false never does, true requires it.",
    )
    sandbox_allow_network: bool = Field(
        False, description="Let local sandbox code and installers use the network."
    )
    sandbox_package_index: str | None = Field(
        None, description="Package index URL for pip and npm installs in sandboxes."
    )
    sandbox_output_limit: int = Field(
        262144,
        ge=1024,
        le=4 * 1024 * 1024,
        description="Bytes of stdout and of stderr kept per execution.",
    )
    sandbox_disk_limit: int = Field(
        2 * 1024**3,
        ge=0,
        description="Bytes of disk that one local sandbox's files may take; an "
        "execution that grows them past it is stopped (0: no limit).",
    )
    sandbox_max_recreations: int = Field(
        3, ge=0, le=20, description="Times one call may recreate a lost sandbox."
    )
    sandbox_spares: int = Field(
        1,
        ge=0,
        le=16,
        description="Started, empty local sandboxes each sandbox worker keeps "
        "ready, so a creation does not wait for a runner to start.",
    )
    sandbox_local_calls: bool = Field(
        True,
        description="Serve executions, uploads and status reads of local "
        "sandboxes as local activities of the session's own worker (one round "
        "trip less); false sends them to the nexus-sandbox queue.",
    )
    encryption_key: SecretStr | None = Field(
        None, description="Base64 AES key for secrets; unset generates one once."
    )
    e2b_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("E2B_API_KEY", "NEXUS_E2B_API_KEY")
    )
    anthropic_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("ANTHROPIC_API_KEY", "NEXUS_ANTHROPIC_API_KEY"),
    )
    sandbox_share_anthropic_key: bool = Field(
        False,
        description="Give claude-code sandboxes created without anthropic_key "
        "the worker's own ANTHROPIC_API_KEY. Their code can read it, so every "
        "caller allowed sandbox tools can.",
    )
    reports_dir: Path = Field(
        Path("reports"), description="Folder for benchmark reports."
    )
    neural_embedded_nodes: bool = Field(
        True,
        description="Run every active cluster node's worker inside the "
        "nexus-neural worker process; false leaves nodes to `nexus worker "
        "--neural-node`.",
    )
    neural_node_heartbeat_timeout_seconds: float = Field(
        15.0,
        gt=0,
        description="Seconds without a heartbeat after which a cluster node's "
        "training attempt times out and is retried. A node heartbeats every "
        "third of this, during long epochs too.",
    )
    anthropic_base_url: str = Field(
        "https://api.anthropic.com",
        description="Base URL of the Anthropic Messages API used by swarm agents.",
    )
    anthropic_model: str = Field(
        "claude-sonnet-4-5", description="Model that swarm agents ask."
    )
    anthropic_max_tokens: int = Field(
        1024, ge=1, le=64000, description="Output token limit of one agent reply."
    )
    storage_signing_key: SecretStr | None = Field(
        None,
        description="Key that signs storage URLs; unset generates one once.",
    )
    realtime_retention_seconds: float = Field(
        3600.0,
        ge=0,
        description="Minimum age in seconds before a change that every "
        "subscription of its table has passed is pruned from the change log.",
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    worker_warm_up: bool = Field(
        True,
        description="Import scikit-learn and start JAX's backend in the "
        "orchestration and neural workers before they poll, so their memory "
        "reaches its working size at startup rather than on first use.",
    )
    worker_allocator: str = Field(
        DEFAULT_SETTING,
        description="Memory allocator of worker processes: system (glibc's "
        "malloc with pymalloc), glibc (glibc's malloc for Python's objects "
        "too, PYTHONMALLOC=malloc) or jemalloc (preloaded, with "
        "PYTHONMALLOC=malloc, returning freed pages to the kernel; falls back "
        "to system where libjemalloc is not installed). One for every worker, "
        "or a default followed by QUEUE=ALLOCATOR entries: "
        "system,nexus-orchestration=glibc.",
    )
    worker_malloc_arena_max: int = Field(
        2,
        ge=0,
        le=64,
        description="glibc malloc arenas a worker process may create (0 keeps "
        "glibc's default of 8 per core); fewer arenas keep less freed memory.",
    )
    worker_malloc_mmap_threshold: int = Field(
        131072,
        ge=0,
        le=32 * 1024 * 1024,
        description="Bytes from which a worker's malloc serves a block with its "
        "own mmap, fixed instead of glibc's rising threshold (0 keeps glibc's).",
    )
    worker_malloc_trim_seconds: float = Field(
        60.0,
        ge=0,
        description="Seconds between the malloc_trim calls with which a worker "
        "returns freed memory to the kernel (0 turns them off).",
    )
    api_rate_limit: float = Field(
        20.0, gt=0, description="Requests per second each API key may average."
    )
    api_rate_burst: int = Field(
        40, ge=1, description="Requests an API key may make at once before waiting."
    )
    api_max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest HTTP request body accepted, in bytes."
    )
    api_key_cache_seconds: float = Field(
        1.0,
        ge=0,
        description="Seconds an HTTP server process reuses a verified API key "
        "before it reads the key again; a key revoked or rotated by another "
        "process is rejected within this bound. 0 reads the key on every call.",
    )
    api_docs: bool = Field(
        False,
        description="Serve the Swagger UI at /docs and ReDoc at /redoc, from "
        "files installed with the server (no CDN); off by default.",
    )
    api_health_max_age_seconds: float = Field(
        1.0,
        ge=0,
        description="Seconds an HTTP server process reuses a system_health "
        "reading; the report's age_seconds states the reading's age. 0 reads "
        "live on every call.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("worker_allocator")
    @classmethod
    def _check_worker_allocator(cls, value: str) -> str:
        parse_allocator_setting(value)
        return value

    @field_validator("temporal_address")
    @classmethod
    def _check_temporal_address(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(
                f"NEXUS_TEMPORAL_ADDRESS={value!r} is not host:port with a port "
                "between 1 and 65535; use for example 127.0.0.1:7233, or unset it "
                "to run the embedded server"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                f"NEXUS_DATABASE_URL={_mask_url(value)!r} is not a database URL; "
                "use sqlite:///path/to/file.db or "
                "postgresql+psycopg://user:password@host:5432/name"
            ) from None
        except ValueError:
            # SQLAlchemy reads the port with int(), which also rejects a
            # libpq list of several hosts.
            raise ValueError(
                f"NEXUS_DATABASE_URL={_mask_url(value)!r} has an invalid port "
                f"{_port_text(_mask_url(value))!r}; give one host with a numeric "
                "port, as in postgresql+psycopg://user:password@host:5432/name"
            ) from None
        driver = _DATABASE_SCHEMES.get(url.drivername)
        if driver is None:
            raise ValueError(
                f"NEXUS_DATABASE_URL uses {url.drivername!r}, which flow-nexus does "
                "not support; use sqlite:/// or postgresql+psycopg://"
            )
        if driver.startswith("postgresql") and not url.database:
            raise ValueError(
                f"NEXUS_DATABASE_URL={_mask_url(value)!r} names no database; "
                "add /DATABASE_NAME after the host"
            )
        return url.set(drivername=driver).render_as_string(hide_password=False)

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'nexus.db'}"

    @property
    def embedded(self) -> bool:
        """True when this process should run or reuse the embedded server."""
        return self.temporal_address is None

    @property
    def effective_temporal_address(self) -> str:
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    def masked(self) -> dict[str, Any]:
        """Return the effective settings with every secret replaced by a mask."""
        values: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                values[name] = "********" if value.get_secret_value() else None
            elif isinstance(value, Path):
                values[name] = str(value)
            elif isinstance(value, str):
                # A URL setting such as a package index may carry a password.
                values[name] = mask_url_passwords(value)
            else:
                values[name] = value
        values["database_url"] = _mask_url(self.effective_database_url)
        values["temporal_address"] = self.effective_temporal_address
        values["data_dir"] = str(self.resolved_data_dir)
        return values


def _mask_url(value: str) -> str:
    # Not SQLAlchemy's `render_as_string(hide_password=True)`: it shows a
    # password given as a query parameter, and the rest of a password that
    # contains an unencoded `@`.
    return mask_url_passwords(value)


def _port_text(url: str) -> str:
    """Return the text after the host in `url`'s authority, for an error."""
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    host = authority.rpartition("@")[2]
    return host.rpartition("]")[2].partition(":")[2]


# Fields whose value an error message must not repeat, besides SecretStr ones.
_SECRET_FIELDS = frozenset({"database_url"})
# The password of `scheme://user:password@host` in any text. It runs to the
# last `@` before the path, because a password may contain an unencoded `@`.
_URL_PASSWORD = re.compile(r"(://[^:/@\s'\"]*):([^/?#\s'\"]*)@")
# A query parameter whose name marks a credential: libpq's `password` and
# `sslpassword`, and the `token`, `key` or `secret` of a package index or an
# API address.
_SECRET_QUERY_PARAMETER = re.compile(
    r"([?&;][^=&#\s'\"]*(?:password|passwd|pwd|token|key|secret|signature|"
    r"credential|auth)[^=&#\s'\"]*=)([^&#\s'\"]*)",
    re.IGNORECASE,
)


def keep_private(folder: Path) -> None:
    """Create `folder` for its owner only, or take group and other access
    from it. A data folder contains the databases, logs and stored objects,
    which include program output and the audit log."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        status = folder.stat()
        if status.st_mode & 0o077 and status.st_uid == os.geteuid():
            folder.chmod(status.st_mode & 0o700)
            logger.info("took group and other access from %s", folder)
    except OSError as error:
        logger.warning("could not make %s private: %s", folder, error)


def mask_url_passwords(text: str) -> str:
    """Replace with `***` the password of every `scheme://user:password@host`
    in `text`, and the value of every query parameter named like a
    credential (`?password=`, `&token=`, `api_key=`)."""
    masked = _URL_PASSWORD.sub(r"\1:***@", text)
    return _SECRET_QUERY_PARAMETER.sub(r"\1***", masked)


def url_passwords(url: str | None) -> list[str]:
    """Return the secrets of `url` that `mask_url_passwords` masks, each as
    written and percent-decoded, for masking in output that an installer,
    a server or a driver may print; none without."""
    if not url:
        return []
    written = [found.group(2) for found in _URL_PASSWORD.finditer(url)]
    written += [found.group(2) for found in _SECRET_QUERY_PARAMETER.finditer(url)]
    secrets = {value for value in written if value}
    # A parser that splits at the first `@` reads the rest of such a
    # password as part of the host, and a driver then quotes that host.
    secrets |= {part for value in secrets for part in value.split("@")[1:] if part}
    return sorted(secrets | {urllib.parse.unquote(value) for value in secrets})


def environment_variable(name: str) -> str:
    """Return the environment variable that sets field `name` of `Settings`.

    For a field with several accepted variables, the one set in the
    environment, else the first.
    """
    field = Settings.model_fields.get(name)
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, AliasChoices):
        choices = [str(choice) for choice in alias.choices]
        present = [choice for choice in choices if choice in os.environ]
        return (present or choices)[0]
    return f"NEXUS_{name.upper()}"


def _field_name(location: str) -> str:
    """Map an error location (a field name or one of its aliases) to a field."""
    if location in Settings.model_fields:
        return location
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices) and location in alias.choices:
            return name
    return location


def _is_secret(name: str) -> bool:
    field = Settings.model_fields.get(name)
    return name in _SECRET_FIELDS or (
        field is not None and "SecretStr" in str(field.annotation)
    )


def _shown_value(name: str, value: Any) -> str:
    if _is_secret(name):
        if name == "database_url" and isinstance(value, str):
            return repr(_mask_url(value))
        return "(hidden: a secret)"
    # A URL such as a package index may carry a password.
    return mask_url_passwords(repr(value))


def _default_text(name: str) -> str:
    field = Settings.model_fields.get(name)
    if field is None or field.default is None or _is_secret(name):
        return "the default"
    default = field.default
    return f"the default {str(default) if isinstance(default, Path) else default!r}"


def settings_or_exit() -> Settings:
    """Return this process's settings, or print each invalid setting to stderr
    (see `settings_error_lines`) and exit with code 2."""
    try:
        return get_settings()
    except ValidationError as error:
        for line in settings_error_lines(error):
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


def settings_error_lines(error: ValidationError) -> list[str]:
    """Describe each invalid setting in one line: the environment variable,
    the value it had (never the value of a secret) and what is accepted."""
    lines = []
    for item in error.errors(include_url=False):
        location = str(item["loc"][0]) if item["loc"] else "settings"
        name = _field_name(location)
        variable = environment_variable(name)
        message = str(item["msg"]).removeprefix("Value error, ")
        if message.startswith(variable):
            # The field's own validator already named the variable and value.
            lines.append(f"invalid setting: {message}")
            continue
        value = _shown_value(name, item.get("input"))
        lines.append(
            f"invalid setting {variable}={value}: {message}; set an accepted "
            f"value, or unset {variable} for {_default_text(name)}"
        )
    return lines


# NEXUS_ variables that are read outside `Settings`: the test suite's
# PostgreSQL server.
_OTHER_VARIABLES = frozenset({"NEXUS_TEST_DATABASE_URL"})


def known_variables() -> frozenset[str]:
    """Return every NEXUS_ environment variable that flow-nexus reads."""
    names = set(_OTHER_VARIABLES)
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(
                str(choice).upper()
                for choice in alias.choices
                if str(choice).upper().startswith("NEXUS_")
            )
        else:
            names.add(f"NEXUS_{name.upper()}")
    return frozenset(names)


def unknown_variable_lines(environ: Mapping[str, str]) -> list[str]:
    """Describe each NEXUS_ variable of `environ` that no setting reads, in
    one line with the closest known name when one is close."""
    known = known_variables()
    lines = []
    # Settings match names case-insensitively, so a lowercase name is known.
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith("NEXUS_") or upper in known:
            continue
        hint = did_you_mean(upper, known)
        lines.append(
            f"unknown setting {variable} is ignored{hint} (`nexus config` shows "
            "the settings)"
        )
    return lines


@functools.cache
def get_settings() -> Settings:
    """Return the settings of this process, read once from the environment.

    Logs a warning for each NEXUS_ variable that no setting reads, since a
    misspelled name would otherwise leave its setting at the default.
    """
    for line in unknown_variable_lines(os.environ):
        logger.warning("%s", line)
    return Settings()

"""Alembic migrations, run from code so no alembic.ini has to be found."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import column, inspect, select, table

from app.db.engine import get_engine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

logger = logging.getLogger(__name__)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would read a % in a password as a reference.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str) -> list[str]:
    """Apply every migration branch up to its head and return the heads."""
    config = alembic_config(url)
    with get_engine(url).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "heads")
    # Capture triggers go on after every branch ran, since other branches
    # create some of the default realtime tables.
    from app.realtime.triggers import enable_default_tables

    enable_default_tables(url)
    heads = current_heads(url)
    logger.info("database at migration heads %s", ",".join(heads))
    return heads


def ensure_current(url: str) -> None:
    """Migrate the database unless it is at the heads of this code already.

    Commands that call tools without `nexus up` (`nexus call`, `nexus mcp`)
    may be the first to open a data folder. Without the tables, every tool
    that reads the database failed with "no such table". Reading the heads
    costs one query, where an upgrade that finds nothing to do takes longer.
    """
    heads = current_heads(url)
    if heads == expected_heads():
        return
    # A database that newer code migrated has heads this code does not know,
    # and alembic would refuse to upgrade it; `system_health` reports that.
    if not set(heads) <= _script_revisions():
        return
    upgrade(url)


# Alembic's default version table. `MigrationContext` builds a new `Table` for
# it on every call, and the engine's compiled cache keeps each one (a new key
# per call; the cache grows to 750 entries before it prunes back to 500). The
# health check reads the heads on every `system_health`, so it selects from
# this one table instead.
_VERSION_TABLE = table("alembic_version", column("version_num"))


def current_heads(url: str) -> list[str]:
    """Return the migration heads recorded in the database ([] before any)."""
    with get_engine(url).connect() as connection:
        if not inspect(connection).has_table(_VERSION_TABLE.name):
            return []
        rows = connection.execute(select(_VERSION_TABLE.c.version_num))
        return sorted(row[0] for row in rows)


@functools.cache
def _script_heads() -> tuple[str, ...]:
    # The heads depend only on the migration scripts shipped with the code,
    # and parsing them costs milliseconds, so one read per process suffices.
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return tuple(sorted(script.get_heads()))


@functools.cache
def _script_revisions() -> frozenset[str]:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return frozenset(revision.revision for revision in script.walk_revisions())


def expected_heads() -> list[str]:
    return list(_script_heads())

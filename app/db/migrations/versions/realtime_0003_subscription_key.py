"""Realtime subscriptions owned by an API key's id, not by its name.

Revision ID: realtime_0003
Revises: realtime_0002
Create Date: 2026-12-20

Two keys may share a name, and a revoked key's name may be given to a new
key, so a name cannot tell which key created a subscription. A subscription
made before this migration with `user_id` `key:<name>` goes to the key of
that name that was active when the subscription was created, followed along
its rotations to the key that replaced it. A subscription for which no
single key fits keeps no key id, so no key may use it; the CLI may still
read and delete it.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "realtime_0003"
down_revision: str | Sequence[str] | None = "realtime_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY_PREFIX = "key:"


def _utc(value: datetime | str | None) -> datetime | None:
    # SQLite returns text, or naive times; every stored time is UTC.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _owner(
    keys: list[sa.Row], replaced_by: dict[str, str | None], created: datetime | None
) -> str | None:
    """Return the id of the key that owns a subscription created at `created`
    by one of `keys` (the keys of its name), or None when none or several fit."""
    active = [
        key
        for key in keys
        if created is None
        or (
            (_utc(key.created_at) or created) <= created
            and (key.revoked_at is None or created < (_utc(key.revoked_at) or created))
        )
    ]
    if len(active) != 1:
        return None
    owner = active[0].id
    seen = {owner}
    while replaced_by.get(owner) is not None:
        owner = replaced_by[owner]
        if owner in seen:
            break
        seen.add(owner)
    return owner


def upgrade() -> None:
    op.add_column(
        "realtime_subscriptions",
        sa.Column("key_id", sa.String(32), nullable=True),
    )
    bind = op.get_bind()
    # Not a dependency on the keys' branch, which would change the heads
    # that a database records. A database without the keys table yet is a
    # new one, without subscriptions.
    if not sa.inspect(bind).has_table("api_keys"):
        return
    keys = bind.execute(
        sa.text("SELECT id, name, created_at, revoked_at, replaced_by FROM api_keys")
    ).all()
    by_name: dict[str, list[sa.Row]] = {}
    for key in keys:
        by_name.setdefault(key.name, []).append(key)
    replaced_by = {key.id: key.replaced_by for key in keys}
    subscriptions = bind.execute(
        sa.text(
            "SELECT id, user_id, created_at FROM realtime_subscriptions "
            "WHERE user_id LIKE 'key:%'"
        )
    ).all()
    for subscription in subscriptions:
        name = subscription.user_id[len(_KEY_PREFIX) :]
        owner = _owner(
            by_name.get(name, []), replaced_by, _utc(subscription.created_at)
        )
        if owner is not None:
            bind.execute(
                sa.text(
                    "UPDATE realtime_subscriptions SET key_id = :key_id WHERE id = :id"
                ),
                {"key_id": owner, "id": subscription.id},
            )


def downgrade() -> None:
    op.drop_column("realtime_subscriptions", "key_id")

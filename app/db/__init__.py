"""Application database: SQLModel models, engines and Alembic migrations."""

from app.db.engine import dispose_engines, get_engine, get_stream_engine, session_scope

__all__ = ["dispose_engines", "get_engine", "get_stream_engine", "session_scope"]

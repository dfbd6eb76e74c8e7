"""Import every table module, so `SQLModel.metadata` is complete."""

from app.db import models as foundation_models

__all__ = ["foundation_models"]

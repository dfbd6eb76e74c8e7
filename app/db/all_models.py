"""Import every table module, so `SQLModel.metadata` is complete."""

from app.api import models as api_models
from app.benchmark import models as benchmark_models
from app.db import models as foundation_models
from app.neural import models as neural_models
from app.realtime import models as realtime_models
from app.sandbox import models as sandbox_models
from app.storage import models as storage_models
from app.swarm import models as swarm_models
from app.workflows import models as workflow_models

__all__ = [
    "api_models",
    "benchmark_models",
    "foundation_models",
    "neural_models",
    "realtime_models",
    "sandbox_models",
    "storage_models",
    "swarm_models",
    "workflow_models",
]

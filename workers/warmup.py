"""First-use work that a worker does before it polls, so that its memory
reaches its working size at startup instead of during its first tasks.

Two kinds of first use are large. The built-in datasets (digits, iris, wine,
breast_cancer) come from scikit-learn, whose import loads about 800 modules
of scikit-learn, SciPy and joblib. JAX's first computation starts its CPU
backend and LLVM. In a scratch process that had imported the worker registry,
the two together raised RSS from 245 MB to 386 MB (2-core machine).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def start_jax_backend() -> None:
    """Run one small jitted computation, so JAX starts its CPU backend now."""
    import jax
    import jax.numpy as jnp

    jax.jit(lambda x: x * 2.0 + 1.0)(jnp.ones(4)).block_until_ready()


WARM_UPS = {"jax": start_jax_backend}


def warm_up(task_queue: str, modules: Sequence[str], steps: Sequence[str]) -> None:
    """Import `modules` and run the named `steps` of `WARM_UPS`.

    A module that is not installed is logged and skipped, since the work that
    would import it then fails the same way later.
    """
    started = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            logger.warning(
                "warm-up of %s: cannot import %s: %s", task_queue, name, error
            )
    for step in steps:
        WARM_UPS[step]()
    logger.info(
        "warm-up of %s took %.1f s (modules %s, steps %s)",
        task_queue,
        time.perf_counter() - started,
        ", ".join(modules) or "none",
        ", ".join(steps) or "none",
    )

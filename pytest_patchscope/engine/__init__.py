"""Batched, prefix-sharing execution of probes: resolution against a model (``resolve``), rows
(``rows``), the packed forward passes (``streams``), decoding steps (``decode``), results
(``results``) and the job runner (``runner``). Nothing here imports pytest.
"""
from pytest_patchscope.engine.runner import (
    DEFAULT_BATCH_MEMORY_MB,
    DEFAULT_MAX_NEW_TOKENS_LIMIT,
    Engine,
    run_probes,
)

__all__ = ["DEFAULT_BATCH_MEMORY_MB", "DEFAULT_MAX_NEW_TOKENS_LIMIT", "Engine", "run_probes"]

"""The "patchscope" Hypothesis settings profile, registered through Hypothesis' own entry point.

Hypothesis runs the "hypothesis" entry points while it is being imported, so this module must not
import Hypothesis at its top (strategies.py does, and would import itself in a circle).
"""
from __future__ import annotations

HYPOTHESIS_PROFILE = "patchscope"
"""Settings profile for model tests: `pytest --hypothesis-profile=patchscope`."""


def register_profile() -> None:
    """Register the "patchscope" settings profile (run by Hypothesis' "hypothesis" entry point).

    deadline=None (a probe takes seconds, and the first one loads the model), 20 examples,
    derandomized when CI is set (the same examples on every run), and HealthCheck.too_slow
    suppressed (drawing is cheap, the probes are not). The function-scoped-fixture check stays on:
    the plugin's fixtures are session-scoped, so it fires only for a test's own fixtures.
    """
    import os

    from hypothesis import HealthCheck, settings

    settings.register_profile(
        HYPOTHESIS_PROFILE,
        deadline=None,
        max_examples=20,
        derandomize=bool(os.environ.get("CI")),
        suppress_health_check=[HealthCheck.too_slow],
    )

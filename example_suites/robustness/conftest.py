"""The robustness properties run under the plugin's "patchscope" Hypothesis profile (deadline=None,
20 examples, derandomized when CI is set) unless --hypothesis-profile names another."""
from hypothesis import settings

from pytest_patchscope.hypothesis_profile import HYPOTHESIS_PROFILE


def pytest_configure(config):
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile(HYPOTHESIS_PROFILE)

"""Reading the plugin's settings: a command-line option wins over its ini key, and every path is
resolved by one rule.

Paths given on the command line are relative to the directory pytest was started in; paths in an
ini file are relative to that ini file's folder. Neither depends on pytest's rootdir, which moves
with the arguments (see ``baseline/keys.py``).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pytest_patchscope.errors import ProbeConfigError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting(config: pytest.Config, name: str) -> str | None:
    """A setting's raw value: the command-line option (dest ``name``) wins over the ini key ``name``."""
    value = config.getoption(name, None)
    if value in (None, ""):
        value = config.getini(name)
    return None if value in (None, "") else str(value)


def int_setting(config: pytest.Config, name: str, default: int) -> int:
    """A setting that must be an int >= 1; anything else is a usage error naming the option."""
    raw = setting(config, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise pytest.UsageError(str(ProbeConfigError(_flag(name), raw, "an int >= 1")))
    return value


def flag_setting(config: pytest.Config, name: str) -> bool:
    """A boolean setting: the store_true option, else the ini key (true/false, yes/no, 1/0)."""
    if config.getoption(name, False):
        return True
    raw = str(config.getini(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise pytest.UsageError(str(ProbeConfigError(f"ini {name}", raw, "true or false (also yes/no, on/off, 1/0)")))


def model_spec(text: str, base: Path) -> str:
    """A model setting: 'default' and a hub id with no such path under ``base`` pass unchanged,
    anything else is a path relative to ``base``."""
    from pytest_patchscope.model.loading import looks_like_hub_id

    if text == "default" or (looks_like_hub_id(text) and not (base / text).exists()):
        return text
    return str((base / Path(text).expanduser()).absolute())


def path_setting(config: pytest.Config, name: str, *, model: bool = False) -> str | None:
    """A path setting as an absolute path (a model setting may also be 'default' or a hub id).

    The command-line value is relative to the invocation directory, the ini value to the ini file.
    """
    raw = config.getoption(name, None)
    if raw not in (None, ""):
        base = config.invocation_params.dir
    else:
        try:
            raw = config.getini(name)
        except ValueError:  # a command-line-only option
            raw = None
        base = config.inipath.parent if config.inipath is not None else config.rootpath
    if raw in (None, ""):
        return None
    if model:
        return model_spec(str(raw), base)
    return str((base / Path(str(raw)).expanduser()).absolute())

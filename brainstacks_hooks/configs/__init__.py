"""The YAML configs shipped in the package: the quickstart pair, their fast variants and the paper's runs.

A config argument (``brainstacks train CONFIG``, ``brainstacks router RUN --config CONFIG``, the recipes,
:func:`brainstacks_hooks.config.load_config`) is a file path or the name of a shipped config, with or without
``.yaml``: ``quickstart_cpu``. An existing file wins over a shipped name, so a copy made with
``brainstacks configs cp quickstart_cpu .`` and edited in place is the one used. ``brainstacks configs`` lists
the shipped names.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from importlib import resources
from pathlib import Path

from ..errors import ConfigError

SUFFIX = ".yaml"
#: Files extracted from a zipped install by ``as_file`` stay until the process exits.
_EXTRACTED = contextlib.ExitStack()
atexit.register(_EXTRACTED.close)


def _files():
    return resources.files(__name__)


def list_configs() -> list[str]:
    """Names of the shipped configs (file names without ``.yaml``), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in _files().iterdir() if p.name.endswith(SUFFIX))


def describe_config(name: str) -> str:
    """The first line of the shipped config's header comment (what it runs), or ``""``."""
    first = config_path(name).read_text(encoding="utf-8").partition("\n")[0]
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def config_path(name: str) -> Path:
    """The file of shipped config ``name`` (``"quickstart_cpu"`` or ``"quickstart_cpu.yaml"``).

    Raises:
        ConfigError: no shipped config has that name; the message lists the shipped names.
    """
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    names = list_configs()
    if stem not in names:
        raise ConfigError(f"unknown config {name!r}; shipped configs: {', '.join(names)}")
    resource = _files() / (stem + SUFFIX)
    if isinstance(resource, Path):  # a regular install (wheel or editable): the file on disk
        return resource
    return _EXTRACTED.enter_context(resources.as_file(resource))  # zipped: a temporary copy


def resolve_config(path_or_name: str | os.PathLike) -> Path:
    """An existing file as given, else the shipped config of that name.

    Raises:
        ConfigError: neither a file nor a shipped name; the message names the argument and lists the shipped
            configs.
    """
    path = Path(path_or_name)
    if path.is_file():
        return path
    text = os.fspath(path_or_name)
    if path.is_dir():
        raise ConfigError(f"config {text} is a directory; give a YAML file or a shipped config: "
                          f"{', '.join(list_configs())}")
    if os.sep in text or (os.altsep and os.altsep in text):
        raise ConfigError(f"config file not found: {text}; shipped configs: {', '.join(list_configs())}")
    try:
        return config_path(text)
    except ConfigError:
        raise ConfigError(f"config {text!r} is neither a file nor a shipped config; shipped configs: "
                          f"{', '.join(list_configs())}") from None

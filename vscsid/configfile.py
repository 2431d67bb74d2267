"""``--config FILE``: the daemon's settings in TOML (read with the standard library's
tomllib), equivalent to the command line.

Keys are the long option names without the dashes (``num-queues`` or
``num_queues``); values are TOML strings, integers, floats or booleans (a boolean
option such as ``quiet = true``). LUNs are an array, either of ``--lun`` strings or
of tables whose ``path`` is the file and whose other keys are the ``--lun``
options::

    socket-path = "/run/vscsid/vm1.sock"
    num-queues = 2
    metrics-address = "127.0.0.1:9250"
    lun = ["/var/lib/vscsid/vm1-swap.img,cache=none"]

    [[luns]]
    path = "/var/lib/vscsid/vm1-root.img"
    target = 0
    lun = 0

    [[luns]]
    path = "/var/lib/vscsid/vm1-data.img"
    target = 1
    ro = true

A relative LUN path is relative to the file's directory. Options on the command
line override the file's. SIGHUP re-reads the file and
applies its LUN differences (the LUNs that came from it; see
vscsid.supervisor.lunops) and the log level; other settings need a restart.
"""
from __future__ import annotations

import os
import tomllib

from .config import ConfigError

#: options that make no sense in a file
_NOT_IN_FILE = {"config", "config-if-exists", "print-capabilities", "version", "help"}


def _relative_to(base: str, text: str) -> str:
    """A LUN spec whose relative FILE is taken relative to the configuration file."""
    path, sep, rest = text.partition(",")
    if path and ":" not in path and not os.path.isabs(path):
        path = os.path.join(base, path)
    return path + sep + rest


def _lun_text(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: a LUN is a string or a table, not {type(item).__name__}")
    path = item.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: a LUN table needs path = \"FILE\"")
    parts = [path]
    for key, value in item.items():
        if key == "path":
            continue
        key = key.replace("-", "_") if key != "delay-us" else "delay_us"
        if isinstance(value, bool):
            parts.append(key if value else f"{key}=off")
        elif isinstance(value, (int, str)):
            text = str(value)
            if "," in text or "=" in text:
                raise ConfigError(f"{where}: LUN option {key} = {text!r}: no ',' or '=' allowed")
            parts.append(f"{key}={text}")
        else:
            raise ConfigError(f"{where}: LUN option {key} must be a string, integer or boolean")
    return ",".join(parts)


def load(path: str, options: dict[str, tuple[bool, bool]]) -> tuple[list[str], list[str]]:
    """(command-line arguments, LUN specs) from the file at ``path``.

    ``options`` maps each long option name to (takes_value, repeatable) (what the
    command-line parser knows)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path!r}: {exc}") from None
    argv: list[str] = []
    luns: list[str] = []
    for key, value in data.items():
        name = key.replace("_", "-")
        where = f"{path}: {key}"
        if name in ("lun", "luns"):
            items = value if isinstance(value, list) else [value]
            base = os.path.dirname(os.path.abspath(path))
            luns += [_relative_to(base, _lun_text(item, where)) for item in items]
            continue
        if name in _NOT_IN_FILE or name not in options:
            known = ", ".join(sorted(set(options) - _NOT_IN_FILE | {"lun"}))
            raise ConfigError(f"{where}: unknown setting (known: {known})")
        takes_value, _repeatable = options[name]
        if not takes_value:
            if not isinstance(value, bool):
                raise ConfigError(f"{where} is a switch: true or false")
            if value:
                argv.append(f"--{name}")
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string or a number")
        argv += [f"--{name}", str(value)]
    return argv, luns

"""The deployment recipes of docs/deploy.md, read from that file so the tests use what it shows.

Each recipe is the fenced code block right after a ``<!-- recipe:NAME -->`` line.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

DEPLOY_MD = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def recipe(name: str) -> str:
    """The text of recipe ``name`` (without the fence lines)."""
    text = DEPLOY_MD.read_text()
    m = re.search(rf"^<!-- recipe:{re.escape(name)} -->\n```[a-z]*\n(.*?)^```$", text, re.M | re.S)
    if m is None:
        raise LookupError(f"no recipe {name!r} in {DEPLOY_MD}")
    return m.group(1)


def qemu_recipe_options() -> list[tuple[str, str]]:
    """The ``(-option, value)`` pairs of the QEMU recipe (the program name and ``...`` left out)."""
    words = shlex.split(recipe("qemu").replace("\\\n", " "))
    words = [w for w in words[1:] if w != "..."]
    if len(words) % 2 or not all(w.startswith("-") for w in words[::2]):
        raise ValueError(f"the QEMU recipe is not a list of -option value pairs: {words}")
    return list(zip(words[::2], words[1::2]))

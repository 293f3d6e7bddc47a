"""The code blocks of the README and docs/, for the tests that check or run them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def page_blocks(page: str, lang: str = "python") -> list[str]:
    """The ``lang`` blocks of one page (path relative to the repository), in order."""
    return [m.group(2) for m in BLOCK.finditer((ROOT / page).read_text()) if m.group(1) == lang]

"""Regenerate README's technique table from src/lmlab/registry.py (`make readme`).

tests/test_registry.py fails when README and the registry differ, so run this after changing a row.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmlab.registry import markdown_table

START, END = "<!-- techniques:start -->", "<!-- techniques:end -->"


def render(readme: str) -> str:
    if START not in readme or END not in readme:
        sys.exit(f"README.md lacks the {START} / {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{markdown_table()}{END}{tail}"


def main() -> None:
    path = Path(__file__).resolve().parent.parent / "README.md"
    new = render(path.read_text())
    path.write_text(new)
    print(f"updated {path}")


if __name__ == "__main__":
    main()

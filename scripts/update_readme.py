"""Regenerate README's generated sections (`make readme`):

- the technique table, from src/lmlab/registry.py;
- the licence policy of `lmlab corpus`, from src/lmlab/corpus/licenses.py;
- the results table, from the ``summary`` block every recipe and benchmark writes into results/<name>.json
  (claim, the paper's figure or target, ours, the command, reproduced?).

tests/test_registry.py fails when README and these sources differ, so run this after changing either.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmlab.registry import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS_HEADER = "| result | claim | paper / target | ours | command | reproduced? |\n|---|---|---|---|---|---|\n"


def results_table(results_dir: Path = ROOT / "results") -> str:
    rows = []
    for path in sorted(results_dir.glob("*.json")):
        summary = json.loads(path.read_text()).get("summary")
        if summary:
            s = summary
            rows.append(f"| `results/{path.name}` | {s['claim']} | {s['paper']} | {s['ours']} | {s['command']} "
                        f"| {s['reproduced']} |\n")
    return RESULTS_HEADER + "".join(rows)


def replace_section(readme: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in readme or end not in readme:
        sys.exit(f"README.md lacks the {start} / {end} markers")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def render(readme: str) -> str:
    from lmlab.corpus.licenses import policy_markdown

    readme = replace_section(readme, "techniques", markdown_table())
    readme = replace_section(readme, "licences", policy_markdown())
    return replace_section(readme, "results", results_table())


def main() -> None:
    path = ROOT / "README.md"
    new = render(path.read_text())
    path.write_text(new)
    print(f"updated {path}")


if __name__ == "__main__":
    main()

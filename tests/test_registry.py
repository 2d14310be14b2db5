from pathlib import Path

import pytest

from lmlab import registry
from lmlab.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- techniques:start -->", "<!-- techniques:end -->"

# every paper of the August 2023 roundup (issue 2 lists them)
ROUNDUP = {"2308.04430", "2308.00951", "2307.11315", "2308.00190", "2307.15217", "2307.14430", "2308.00675",
           "2307.16789", "2307.15818", "2308.00566", "2308.03661", "2308.03905", "2308.04014", "2308.06093",
           "2308.12066", "2308.11971", "2308.12202", "2308.00720", "2308.11696", "2308.09687", "2308.10248",
           "2308.10792", "2308.11483", "2308.12284"}


def test_registry_lists_every_paper_of_the_roundup_once():
    ids = [t.arxiv for t in registry.TECHNIQUES]
    assert set(ids) == ROUNDUP
    assert len(ids) == len(set(ids))
    assert len({t.key for t in registry.TECHNIQUES}) == len(ids)


def test_readme_technique_table_matches_the_registry():
    readme = (ROOT / "README.md").read_text()
    section = readme.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert section == registry.markdown_table(), "README is stale: run `make readme`"


def test_readme_results_table_matches_results_folder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    assert mod.render(readme) == readme, "README is stale: run `make readme`"
    for path in (ROOT / "results").glob("*.json"):
        assert f"results/{path.name}" in readme


def test_statuses_are_true():
    for t in registry.TECHNIQUES:
        if t.status == "works":
            # a working technique has its module, its CLI and a recipe that wrote results
            assert t.module and t.cli and t.recipe, t.key
            name = Path(t.recipe).stem
            assert (ROOT / "results" / f"{name}.json").is_file(), f"{t.key}: no results/{name}.json"
        if t.status in {"works", "partial"} and t.module:
            import importlib.util

            assert importlib.util.find_spec(t.module) is not None, f"{t.key}: {t.module} does not exist"
        if t.status == "partial":
            assert t.note, f"{t.key}: a partial row says what exists in its note"


def test_bad_status_and_unknown_key_are_refused():
    with pytest.raises(ValueError):
        registry.Technique("x", "t", "1", "f", "m", "c", "r", "done")
    with pytest.raises(ConfigError, match="lmlab ls"):
        registry.get("no-such-paper")
    assert registry.get("silo").arxiv == "2308.04430"

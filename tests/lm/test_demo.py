import json

import pytest

from lmlab.errors import DataError
from lmlab.lm.demo import DemoConfig, machine_texts, run


@pytest.fixture()
def source(tmp_path):
    d = tmp_path / "doc"
    for i in range(120):
        pkg = d / f"pkg{i}"
        pkg.mkdir(parents=True)
        (pkg / "README.md").write_text(f"Package {i} does useful things. " * 20)
        (pkg / "changelog").write_text("skipped " * 100)
        (pkg / "table.txt").write_text("| 0x1F | ░░ | ▓▓ |\n" * 50)
    return d


def test_machine_texts_keeps_prose_and_skips_changelogs_and_tables(source):
    texts = list(machine_texts(source, max_bytes=10**9))
    assert len(texts) == 120 and all(t.startswith("Package") for t in texts)
    assert len(list(machine_texts(source, max_bytes=1000))) < 5


def test_demo_runs_end_to_end_and_lowers_perplexity(tmp_path, source):
    cfg = DemoConfig(out=str(tmp_path / "demo"), source=str(source), vocab_size=300, preset="micro", steps=30,
                     seq_len=32, batch_size=8, lr=1e-2, eval_tokens=2000)
    lines = []
    result = run(cfg, echo=lines.append)
    assert result["val_ppl_after"] < result["val_ppl_before"] / 2
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["steps"] == 30
    assert any("validation perplexity after training" in line for line in lines)
    # a second run reuses tokenizer, shards and the finished training run
    again = run(cfg, echo=lines.append)
    assert again["val_ppl_after"] == pytest.approx(result["val_ppl_after"])


def test_demo_without_enough_text_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        run(DemoConfig(out=str(tmp_path / "d"), source=str(tmp_path / "none")), echo=lambda s: None)
    (tmp_path / "afile.txt").write_text("text")
    with pytest.raises(DataError, match="afile.txt is a file, not a folder"):  # said "does not exist"
        run(DemoConfig(out=str(tmp_path / "d"), source=str(tmp_path / "afile.txt")), echo=lambda s: None)


@pytest.mark.parametrize("argv, words", [
    (["--max-mb", "nan"], "max_mb must be positive and finite, not nan"),  # int(nan) ValueError
    (["--seed", "-1"], "seed must be in [0, "),  # numpy's ValueError
    (["--preset", "huge"], "unknown tiny preset 'huge'; choose one of micro, small, 7m"),  # after the tokenizer
    (["--steps", "0"], "max_steps must be >= 1, not 0"),
])
def test_bad_demo_options_are_one_line_before_any_work(tmp_path, capsys, argv, words):
    from lmlab.cli import main

    assert main(["lm", "demo", "--out", str(tmp_path / "d"), "--source", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_the_preset_may_be_given_as_its_model_spec(tmp_path, monkeypatch):
    # the help says tiny:<preset>, and `--preset tiny:micro` was an unknown preset
    from lmlab.cli import main
    from lmlab.lm import demo

    seen = []
    monkeypatch.setattr(demo, "run", lambda cfg, echo: seen.append(cfg))
    assert main(["lm", "demo", "--out", str(tmp_path / "d"), "--preset", "tiny:micro"]) == 0
    assert seen[0].preset == "micro"


def test_demo_resumes_after_an_interrupt_between_the_two_shard_renames(tmp_path, source, monkeypatch):
    # validation/ moved into place, then Ctrl-C before train/: the rerun saw validation's manifest, skipped the
    # build and stopped with "train has no manifest.json" instead of resuming
    import os

    cfg = DemoConfig(out=str(tmp_path / "demo"), source=str(source), vocab_size=300, preset="micro", steps=2,
                     seq_len=32, batch_size=4, eval_tokens=500)
    real_replace = os.replace

    def interrupted(src, dst):
        if str(dst).endswith(os.path.join("tokens", "train")):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, echo=lambda s: None)
    monkeypatch.undo()
    assert run(cfg, echo=lambda s: None)["steps"] == 2

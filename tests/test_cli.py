import subprocess
import sys
import time

import click
import pytest

from lmlab.cli import main


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, timeout=timeout)


def test_help_is_fast_and_imports_no_heavy_module():
    code = ("import sys, time; t = time.perf_counter(); from lmlab.cli import main; "
            "rc = main(['--help']); print(time.perf_counter() - t); "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'numpy')))")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    assert "Commands:" in proc.stdout and "serve-lm" in proc.stdout
    assert lines[-1] == "False", "lmlab --help imported torch/transformers/numpy"
    assert wall < 5.0  # the interpreter itself; the CLI part is measured below
    assert float(lines[-2]) < 1.0


def test_ls_lists_every_technique(capsys):
    assert main(["ls", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 26 and "2308.04430" in out and "| d4 |" in out


def test_user_errors_are_one_line_and_exit_2():
    proc = _run("lm", "tokenize", "--data", "/no/such/folder", "--tokenizer", "tiny:micro", "--out", "/tmp/x")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_model_is_one_line(capsys):
    assert main(["lm", "train", "--model", "gpt-17", "--data", ".", "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-17'" in err and "smollm2-135m" in err


def test_negative_thread_count_is_one_line(capsys):
    assert main(["lm", "train", "--model", "tiny:micro", "--data", ".", "--out", "/tmp/never", "--threads", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--threads must be at least 0, not -1" in err and len(err.strip().splitlines()) == 1, err


def test_usage_errors_and_unwritable_paths_are_one_line(capsys, tmp_path):
    assert main(["moe", "train", "--mlp", "bogus", "--out", str(tmp_path / "o")]) == 2  # click's bad choice
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: Invalid value for '--mlp'") and "lmlab moe train -h" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert main(["lm", "tokenize", "--data", str(tmp_path / "nope")]) == 2  # a missing required option
    err = capsys.readouterr().err
    assert "Missing option" in err and len(err.strip().splitlines()) == 1, err
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = main(["lm", "tokenizer", "--data", str(tmp_path), "--out", str(afile / "sub")])  # a folder inside a file
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("lmlab: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and afile.read_text() == "x"


def test_ls_refuses_an_unknown_family(capsys):
    assert main(["ls", "--family", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown --family 'bogus': choose from" in err and "moe" in err and len(err.strip().splitlines()) == 1


def test_number_callbacks_refuse_nan_and_infinity():
    from lmlab.cli import at_least, between, greater_than
    from lmlab.errors import ConfigError

    param = click.Option(["--rate"])
    assert at_least(0)(None, param, 0) == 0 and greater_than(0)(None, param, 0.5) == 0.5
    assert between(0, 1)(None, param, 1.0) == 1.0 and at_least(1)(None, param, None) is None
    for check, bad in ((at_least(0), -1), (greater_than(0), 0.0), (between(0, 1), 1.5), (at_least(0), float("nan")),
                       (between(0, 1), float("nan")), (at_least(0), float("inf"))):
        with pytest.raises(ConfigError, match="--rate must be"):
            check(None, param, bad)


def test_models_ls_shows_named_and_tiny_models(capsys):
    assert main(["models", "ls"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny:micro" in out


def test_perplexity_command_on_a_local_model(tmp_path, tiny, capsys):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("some text to score, " * 30)
    assert main(["lm", "perplexity", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"),
                 "--window", "64", "--stride", "32"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.split("perplexity ")[1].split()[0])
    assert 1.0 < ppl < 2 * len(tiny.tokenizer)


@pytest.mark.parametrize("exc, rc, message", [
    (KeyboardInterrupt(), 130, "lmlab: interrupted"),
    (EOFError("stream ended"), 1, "lmlab: error: EOFError: stream ended"),  # click wraps it in Abort too
    (click.Abort(), 1, "lmlab: aborted"),
])
def test_only_ctrl_c_is_reported_as_an_interrupt(monkeypatch, capsys, exc, rc, message):
    import types

    from lmlab import cli as root

    @click.command("boom")
    def boom():
        raise exc

    monkeypatch.setitem(sys.modules, "lmlab_test_boom", types.SimpleNamespace(boom=boom))
    monkeypatch.setitem(root.COMMANDS, "boom", ("lmlab_test_boom:boom", "raises"))
    assert main(["boom"]) == rc
    err = capsys.readouterr().err
    assert message in err and (rc == 130 or "interrupted" not in err)

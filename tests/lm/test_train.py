import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.errors import CheckpointError, ManifestMismatchError
from lmlab.lm import data, models, tokenizer
from lmlab.lm import train as train_mod
from lmlab.lm.train import TrainConfig, Trainer, latest_checkpoint

CFG = TrainConfig(seq_len=32, batch_size=4, max_steps=12, warmup_steps=3, lr=3e-3, min_lr=3e-4,
                  eval_every=4, eval_batches=2, save_every=4, log_every=2, seed=7)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    texts = [f"record {i}: " + "lorem ipsum dolor sit amet, consectetur adipiscing elit. " * (1 + i % 7)
             for i in range(200)]
    f = data.build_token_shards(texts, tokenizer.byte_tokenizer(), root, validation_fraction=0.1)
    return data.TokenShards(f["train"]), data.TokenShards(f["validation"])


def _trainer(out, shards, cfg=CFG, **kw):
    torch.set_num_threads(1)
    m = models.load("tiny:micro", seed=0)
    return Trainer(m.model, m.tokenizer, shards[0], cfg, out, validation=shards[1], progress=False, **kw)


def _curve(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_training_reduces_loss_and_writes_a_loadable_model(tmp_path, shards):
    r = _trainer(tmp_path / "run", shards).fit()
    curve = _curve(tmp_path / "run")
    assert r.step == 12 and curve[-1]["step"] == 12
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert r.eval_loss is not None and r.eval_ppl == pytest.approx(torch.tensor(r.eval_loss).exp().item())
    reloaded = models.load(str(tmp_path / "run" / "model"))
    assert reloaded.model.config.hidden_size == 32
    # keep_checkpoints=2: only the two most recent remain
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000008", "step-00000012"]


def test_resume_reproduces_the_uninterrupted_curve_exactly(tmp_path, shards):
    _trainer(tmp_path / "full", shards).fit()
    first = _trainer(tmp_path / "split", shards)
    first.fit(until_step=6)  # stops between checkpoints 4 and 8: step 6 is saved on the way out
    assert latest_checkpoint(tmp_path / "split").name == "step-00000006"
    second = _trainer(tmp_path / "split", shards)
    assert second.step == 6
    second.fit()
    full, split = _curve(tmp_path / "full"), _curve(tmp_path / "split")
    assert [r["step"] for r in full] == [r["step"] for r in split]
    for a, b in zip(full, split, strict=True):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
        assert a.get("eval_loss") == b.get("eval_loss")
    wa = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_a_sharded_checkpoint(tmp_path, shards):
    """A model that save_pretrained splits into shards (above max_shard_size) resumes as exactly as one file."""
    _trainer(tmp_path / "full", shards).fit()
    first = _trainer(tmp_path / "split", shards)
    save = first.model.save_pretrained
    first.model.save_pretrained = lambda folder, **kw: save(folder, **kw, max_shard_size="40KB")
    first.fit(until_step=6)
    ckpt = latest_checkpoint(tmp_path / "split")
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1 and not (ckpt / "model.safetensors").exists()
    second = _trainer(tmp_path / "split", shards)
    assert second.step == 6
    second.fit()
    assert [(r["loss"], r.get("eval_loss")) for r in _curve(tmp_path / "full")] == [
        (r["loss"], r.get("eval_loss")) for r in _curve(tmp_path / "split")]


def _ctrl_c_at_step(monkeypatch, step: int, method: str = "train_step") -> None:
    """Make ``Trainer.<method>`` raise KeyboardInterrupt when called at step ``step`` (train_step: when it is about
    to run step ``step`` + 1)."""
    real = getattr(Trainer, method)

    def flaky(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, method, flaky)


def test_interrupt_saves_a_checkpoint_and_resume_continues(tmp_path, shards, monkeypatch):
    t = _trainer(tmp_path / "run", shards)
    _ctrl_c_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run").name == "step-00000005"
    resumed = _trainer(tmp_path / "run", shards)
    assert resumed.step == 5
    assert resumed.fit().step == 12
    assert [r["step"] for r in _curve(tmp_path / "run")] == [2, 4, 6, 8, 10, 12]


def test_ctrl_c_during_the_optimizer_step_is_held_until_the_step_is_counted(tmp_path, shards):
    """A real SIGINT right after optimizer.step() updated the parameters: the interrupt lands only once the step is
    counted, so the checkpoint saved on the way out is that step's, and resuming matches an uninterrupted run
    (it was saved as the step before, and resuming applied the update twice)."""
    import signal

    cfg = replace(CFG, max_steps=4, save_every=0, eval_every=0)
    full = _trainer(tmp_path / "full", shards, cfg=cfg)
    full.fit()
    t = _trainer(tmp_path / "split", shards, cfg=cfg)
    real_step, calls = t.optimizer.step, []

    def step_with_ctrl_c(*a, **k):
        out = real_step(*a, **k)
        calls.append(1)
        if len(calls) == 2:  # the second step's parameters are updated, its count not yet
            os.kill(os.getpid(), signal.SIGINT)
        return out

    t.optimizer.step = step_with_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert t.step == 2 and latest_checkpoint(tmp_path / "split").name == "step-00000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = _trainer(tmp_path / "split", shards, cfg=cfg)
    assert resumed.step == 2
    resumed.fit()
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True))


def test_resume_between_log_steps_logs_the_same_mean_loss(tmp_path, shards):
    # log_every=2: stopping at step 5 used to make the resumed run log step 6's loss alone, not the 5-6 mean
    _trainer(tmp_path / "full", shards).fit()
    _trainer(tmp_path / "split", shards).fit(until_step=5)
    _trainer(tmp_path / "split", shards).fit()
    full, split = _curve(tmp_path / "full"), _curve(tmp_path / "split")
    assert [(r["step"], r["loss"]) for r in full] == [(r["step"], r["loss"]) for r in split]


def test_fit_again_after_an_interrupt_mid_accumulation_matches_an_uninterrupted_run(tmp_path, shards, monkeypatch):
    # Ctrl-C between two micro-batches, then fit() again in the same process (a notebook): the interrupted
    # step's gradients used to leak into the next step
    cfg = replace(CFG, grad_accum=2, max_steps=3, save_every=0, eval_every=0)
    full = _trainer(tmp_path / "full", shards, cfg=cfg)
    full.fit()
    t = _trainer(tmp_path / "split", shards, cfg=cfg)
    real, calls = train_mod.lm_loss, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 4:  # the second micro-batch of step 1
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_mod, "lm_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    monkeypatch.setattr(train_mod, "lm_loss", real)
    assert t.step == 1
    t.fit()
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), t.model.parameters(), strict=True))


def test_resume_with_different_settings_is_refused(tmp_path, shards):
    _trainer(tmp_path / "run", shards).fit(until_step=4)
    with pytest.raises(CheckpointError, match="different settings.*lr"):
        _trainer(tmp_path / "run", shards, cfg=replace(CFG, lr=1e-2))
    # max_steps may change (train longer)
    assert _trainer(tmp_path / "run", shards, cfg=replace(CFG, max_steps=20)).step == 4


@pytest.mark.parametrize("argv, words", [
    (["--min-lr", "-1"], "min_lr (the cosine floor) must be in [0, 0.001]"),  # trained with a negative LR
    (["--rewarm-start-lr", "-1"], "start_lr (the LR a rewarm starts from) must be in [0, 0.001]"),
    (["--rewarm-start-lr", "5", "--schedule", "rewarm"], "start_lr (the LR a rewarm starts from)"),
    (["--eval-every", "-1"], "eval_every must be >= 0, not -1"),
    (["--save-every", "-1"], "save_every must be >= 0, not -1"),
    (["--log-every", "-1"], "log_every must be >= 1, not -1"),
    (["--log-every", "0"], "log_every must be >= 1, not 0"),  # ZeroDivisionError
    (["--seed", "-1"], "seed must be in [0, "),  # numpy's ValueError
    (["--seed", str(2**64)], "seed must be in [0, "),  # torch's overflow
    (["--lr", "nan"], "the peak learning rate must be positive and finite, not nan"),  # torch's ValueError
    (["--threads", "100000"], "--threads must be at most 256, not 100000"),  # a segfault in OpenBLAS
])
def test_bad_train_options_are_one_line_before_anything_loads(tmp_path, capsys, argv, words):
    from lmlab.cli import main

    # --data holds no shards and --model is unknown: the options are refused first
    assert main(["lm", "train", "--model", "gpt-17", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                 *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage", ["truncate_state", "garble_state", "truncate_weights"])
def test_a_corrupt_checkpoint_is_a_checkpoint_error(tmp_path, shards, damage):
    # torch.load's RuntimeError on a truncated trainer_state.pt used to be a traceback
    _trainer(tmp_path / "run", shards).fit(until_step=4)
    ckpt = latest_checkpoint(tmp_path / "run")
    name = "model.safetensors" if damage == "truncate_weights" else "trainer_state.pt"
    f = ckpt / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage.startswith("truncate") else b"\x00" * len(data))
    with pytest.raises(CheckpointError, match=r"step-00000004 is corrupt or incomplete .*delete that folder"):
        _trainer(tmp_path / "run", shards)


def test_data_from_another_tokenizer_is_refused(tmp_path, shards):
    other = tokenizer.train_bpe(["some text to learn merges from " * 50], vocab_size=300)
    m = models.load("tiny:micro", tokenizer=other)
    with pytest.raises(ManifestMismatchError):
        Trainer(m.model, m.tokenizer, shards[0], CFG, tmp_path / "run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_train(out, tok_dir, *, nproc, grad_accum):
    args = ["lm", "train", "--model", "tiny:micro", "--data", str(tok_dir), "--out", str(out), "--steps", "6",
            "--seq-len", "32", "--batch-size", "4", "--grad-accum", str(grad_accum), "--warmup", "2",
            "--eval-every", "0", "--save-every", "0", "--log-every", "1", "--threads", "1", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmlab", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lmlab", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]
    return load_file(str(Path(out) / "model" / "model.safetensors"))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path, shards):
    """2 ranks x grad_accum 1 sees the same micro-batches as 1 rank x grad_accum 2: same weights."""
    tok_dir = Path(shards[0].folder).parent
    ddp = _cli_train(tmp_path / "ddp", tok_dir, nproc=2, grad_accum=1)
    single = _cli_train(tmp_path / "single", tok_dir, nproc=1, grad_accum=2)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5)
    losses = [r["loss"] for r in _curve(tmp_path / "ddp")]
    single_losses = [r["loss"] for r in _curve(tmp_path / "single")]
    assert losses == pytest.approx(single_losses, rel=1e-4)
    assert latest_checkpoint(tmp_path / "ddp").name == "step-00000006"


def test_resume_after_a_torn_metrics_line(tmp_path, shards):
    # a crash (disk full, kill -9) in the middle of appending a metrics line left a partial last line: resuming
    # raised a raw JSONDecodeError and the run could not continue
    _trainer(tmp_path / "full", shards).fit()
    _trainer(tmp_path / "split", shards).fit(until_step=6)
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')
    _trainer(tmp_path / "split", shards).fit()
    full, split = _curve(tmp_path / "full"), _curve(tmp_path / "split")
    assert [(r["step"], r["loss"]) for r in full] == [(r["step"], r["loss"]) for r in split]


def test_a_run_that_died_before_its_first_checkpoint_starts_a_clean_curve(tmp_path, shards, monkeypatch):
    # a crash before the first checkpoint (here an error in the first save) left metrics lines for steps 2 and 4;
    # the fresh start appended its own, so the curve listed steps 2 and 4 twice
    def disk_full(self, **kw):
        raise OSError("No space left on device")

    monkeypatch.setattr(Trainer, "save_checkpoint", disk_full)
    with pytest.raises(OSError):
        _trainer(tmp_path / "run", shards).fit()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run") is None and _curve(tmp_path / "run")
    _trainer(tmp_path / "full", shards).fit()
    _trainer(tmp_path / "run", shards).fit()
    full, run = _curve(tmp_path / "full"), _curve(tmp_path / "run")
    assert [(r["step"], r["loss"]) for r in full] == [(r["step"], r["loss"]) for r in run]


@pytest.mark.parametrize("same_process", [False, True])
@pytest.mark.parametrize("at", [4, 12])
def test_ctrl_c_during_evaluation_keeps_the_curve_exact(tmp_path, shards, monkeypatch, same_process, at):
    # a Ctrl-C while evaluating step 4 came after step 4 was counted but before its metrics line: the checkpoint was
    # step 4 and the resumed run never wrote that line, and logged step 6 as the mean of steps 3-6
    cfg = replace(CFG, save_every=0)
    _trainer(tmp_path / "full", shards, cfg=cfg).fit()
    t = _trainer(tmp_path / "split", shards, cfg=cfg)
    _ctrl_c_at_step(monkeypatch, at, "evaluate")
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "split").name == f"step-{at:08d}"
    # the line is written first, and the step saved again: a later resume does not write it a second time
    (t if same_process else _trainer(tmp_path / "split", shards, cfg=cfg)).fit(until_step=at)
    _trainer(tmp_path / "split", shards, cfg=cfg).fit()
    full, split = _curve(tmp_path / "full"), _curve(tmp_path / "split")
    assert [r["step"] for r in full] == [r["step"] for r in split]
    for a, b in zip(full, split, strict=True):
        assert (a["loss"], a["lr"], a.get("eval_loss")) == (b["loss"], b["lr"], b.get("eval_loss"))


def test_an_interrupted_evaluate_restores_the_training_mode(tmp_path, shards, monkeypatch):
    t = _trainer(tmp_path / "run", shards)
    t.model.train()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "lm_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        t.evaluate()
    assert t.model.training
    monkeypatch.undo()
    t.model.eval()
    t.evaluate()
    assert not t.model.training  # a model the caller had in eval mode stays there


def test_ctrl_c_right_after_a_metrics_line_is_written_does_not_log_it_twice(tmp_path, shards, monkeypatch):
    """A real SIGINT just after step 4's line was appended: the interval it logged is reset before the interrupt
    lands, so the checkpoint does not hold it as unlogged (resuming wrote step 4's line a second time)."""
    import signal

    _trainer(tmp_path / "full", shards).fit()
    real_log = Trainer._log

    def log_then_ctrl_c(self, record):
        real_log(self, record)
        if record["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "_log", log_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "split", shards).fit()
    monkeypatch.undo()
    _trainer(tmp_path / "split", shards).fit()
    full, split = _curve(tmp_path / "full"), _curve(tmp_path / "split")
    assert [(r["step"], r["loss"]) for r in full] == [(r["step"], r["loss"]) for r in split]


def test_a_fresh_run_over_an_old_one_never_resumes_the_old_checkpoints(tmp_path, shards, monkeypatch):
    # resume=False in a folder holding a finished run: the new run's checkpoints were pruned as the oldest (its
    # step 5 beside the old 8 and 12), so after a Ctrl-C the next resume silently continued the old run at step 12
    _trainer(tmp_path / "run", shards).fit()
    _ctrl_c_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "run", shards, cfg=replace(CFG, seed=8), resume=False).fit()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run").name == "step-00000005"
    assert _trainer(tmp_path / "run", shards, cfg=replace(CFG, seed=8)).step == 5


def test_a_run_folder_whose_model_subfolder_is_someone_elses_is_refused_before_training(tmp_path, shards):
    from lmlab.errors import DataError

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "weights.bin").write_bytes(b"mine")
    with pytest.raises(DataError, match="is not a model exported by a run"):
        _trainer(tmp_path / "run", shards)
    assert (tmp_path / "run" / "model" / "weights.bin").read_bytes() == b"mine"


def test_a_fresh_run_deletes_only_its_own_kind_of_checkpoints(tmp_path, shards):
    cfg = replace(CFG, max_steps=4, eval_every=0)
    _trainer(tmp_path / "run", shards, cfg=cfg).fit()
    (tmp_path / "run" / "checkpoints" / "notes.txt").write_text("keep me")
    t = _trainer(tmp_path / "run", shards, cfg=cfg, resume=False)
    assert t.step == 0 and latest_checkpoint(tmp_path / "run") is None
    assert (tmp_path / "run" / "checkpoints" / "notes.txt").read_text() == "keep me"

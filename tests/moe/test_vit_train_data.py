import gzip
import json
import struct

import numpy as np
import pytest
import torch

from lmlab.errors import ConfigError, DataError
from lmlab.moe import MoEConfig, ViT, ViTConfig
from lmlab.moe.data import ImageSplit, load_fashion_mnist, read_idx
from lmlab.moe.train import TrainConfig, evaluate, load_model, save_model, train_classifier

torch.set_num_threads(1)


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    """Synthetic Fashion-MNIST-format files: class = stripe orientation/period (learnable in a few steps)."""
    rng = np.random.default_rng(0)

    def make(n):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 40, (n, 28, 28))
        grid = np.arange(28)
        for i, y in enumerate(labels):
            period = 2 if y < 2 else 7
            stripes = (grid // period) % 2 == 0
            images[i][stripes if y % 2 == 0 else slice(None), slice(None) if y % 2 == 0 else stripes] += 200
        return images, labels

    for split, n in (("train", 400), ("t10k", 100)):
        images, labels = make(n)
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_idx_reader_and_splits(fake_fmnist):
    assert read_idx(fake_fmnist / "train-images-idx3-ubyte.gz").shape == (400, 28, 28)
    data = load_fashion_mnist(fake_fmnist, val_size=50, seed=0)
    assert len(data.train) == 350 and len(data.val) == 50 and len(data.test) == 100
    assert data.train.images.shape[1:] == (1, 28, 28) and data.train.labels.dtype == torch.long


def test_missing_dataset_names_the_install_command(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_truncated_idx_is_a_data_error(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


@pytest.mark.parametrize("kind", ["dense", "soft", "token_choice", "expert_choice", "ewa"])
def test_vit_hosts_every_kind_in_the_last_blocks(kind):
    torch.manual_seed(0)
    cfg = ViTConfig(dim=16, depth=3, heads=2, mlp_hidden=32, moe=MoEConfig(kind=kind, num_experts=4), moe_layers=2)
    model = ViT(cfg)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.logits.shape == (2, 10) and len(out.mlp_outputs) == 3
    assert type(model.blocks[0].mlp).__name__ == "DenseMLP"


def test_training_learns_and_checkpoint_roundtrips(fake_fmnist, tmp_path):
    data = load_fashion_mnist(fake_fmnist, val_size=50)
    torch.manual_seed(0)
    model = ViT(ViTConfig(dim=16, depth=2, heads=2, mlp_hidden=32, patch_size=7, num_classes=4,
                          moe=MoEConfig(kind="soft", num_experts=4, slots_per_expert=4), moe_layers=1))
    result = train_classifier(model, data.train, TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=5))
    assert len(result.step_seconds) == 40 and result.losses[-1] < result.losses[0]
    acc = evaluate(model, data.test)
    assert acc > 0.6
    save_model(model, tmp_path / "ckpt", info={"note": "test"})
    loaded, manifest = load_model(tmp_path / "ckpt")
    assert manifest["note"] == "test" and evaluate(loaded, data.test) == acc


def test_cli_train_ewa_and_eval(fake_fmnist, tmp_path):
    from click.testing import CliRunner

    from lmlab.moe.cli import moe_group

    out = tmp_path / "ewa"
    args = ["train", "--ewa", "--experts", "2", "--moe-layers", "1", "--dim", "16", "--depth", "2", "--heads", "2",
            "--patch-size", "7", "--steps", "3", "--batch-size", "16", "--val-size", "20", "--data",
            str(fake_fmnist), "--out", str(out)]
    res = CliRunner().invoke(moe_group, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output.strip().splitlines()[-1])
    model, manifest = load_model(out)
    assert manifest["trained_as"] == "ewa" and model.config.moe is None  # saved collapsed: a plain ViT
    res = CliRunner().invoke(moe_group, ["eval", str(out), "--data", str(fake_fmnist)])
    assert res.exit_code == 0 and json.loads(res.output)["test_accuracy"] == metrics["test_accuracy"]


def test_truncated_idx_header_is_a_data_error(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">I", 10))  # says 3 dims, holds 1
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


@pytest.mark.parametrize("field", ["patch_size", "heads", "dim", "depth"])
def test_vit_config_refuses_non_positive_sizes(field):
    with pytest.raises(ConfigError, match=field):
        ViTConfig(**{field: 0})


def test_training_that_diverges_stops_with_one_line_and_saves_nothing(fake_fmnist, tmp_path, capsys):
    from lmlab.cli import main

    out = tmp_path / "never"
    code = main(["moe", "train", "--data", str(fake_fmnist), "--val-size", "20", "--steps", "20", "--batch-size", "8",
                 "--dim", "16", "--depth", "2", "--heads", "2", "--patch-size", "7", "--lr", "1e12",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged at step" in err and "lower the learning rate" in err, err
    assert not out.exists()
    for lr in (float("nan"), 0.0):
        with pytest.raises(ConfigError, match="lr must be > 0"):
            TrainConfig(lr=lr)
    with pytest.raises(ConfigError, match="ewa_beta"):
        TrainConfig(ewa_beta=float("nan"))


def test_empty_batches_and_training_sets_are_refused(fake_fmnist):
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(DataError, match="train_size"):
        load_fashion_mnist(fake_fmnist, val_size=50, train_size=0)
    empty = ImageSplit(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="no training images"):
        train_classifier(ViT(ViTConfig(dim=16, depth=1, heads=2, mlp_hidden=32, patch_size=7)), empty, TrainConfig())


@pytest.mark.parametrize("args,why", [(["--heads", "0"], "heads"), (["--patch-size", "0"], "patch_size"),
                                      (["--batch-size", "0"], "batch_size"), (["--train-size", "0"], "train_size"),
                                      (["--mlp", "soft", "--capacity-factor", "-1"], "--capacity-factor"),
                                      (["--lr", "-1"], "lr"), (["--threads", "-3"], "--threads"),
                                      (["--ewa", "--ewa-beta", "2"], "--ewa-beta"),
                                      (["--ewa", "--ewa-beta", "-0.5"], "--ewa-beta"),
                                      (["--lr", "nan"], "--lr"), (["--ewa-beta", "5"], "--ewa-beta"),
                                      (["--mlp", "soft", "--k", "0"], "--k"), (["--experts", "-1"], "--experts"),
                                      (["--seed", "-1"], "--seed"),
                                      (["--threads", "100000"], "--threads must be at most 256")])
def test_cli_train_refuses_bad_sizes_in_one_line(fake_fmnist, tmp_path, capsys, args, why):
    from lmlab.cli import main

    out = tmp_path / "never"
    code = main(["moe", "train", "--data", str(fake_fmnist), "--val-size", "20", "--steps", "2", "--batch-size", "8",
                 "--dim", "16", "--depth", "2", "--heads", "2", "--patch-size", "7", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and why in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cli_train_refuses_an_out_folder_that_is_not_a_model_before_training(fake_fmnist, tmp_path, capsys):
    """--out is replaced by the saved model: a folder holding anything else is refused, and before training."""
    from lmlab.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code = main(["moe", "train", "--data", str(fake_fmnist), "--val-size", "20", "--steps", "2", "--batch-size", "8",
                 "--dim", "16", "--depth", "2", "--heads", "2", "--patch-size", "7", "--out", str(mine)])
    err = capsys.readouterr().err
    assert code == 2 and "is not a saved ViT" in err and len(err.strip().splitlines()) == 1, err
    assert (mine / "notes.txt").read_text() == "keep me"
    model = ViT(ViTConfig(dim=16, depth=1, heads=2, mlp_hidden=32, patch_size=7))
    with pytest.raises(DataError, match="is not a saved ViT"):
        save_model(model, mine)
    save_model(model, tmp_path / "ckpt")
    save_model(model, tmp_path / "ckpt")  # an earlier saved ViT is replaced

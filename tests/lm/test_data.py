import json

import numpy as np
import pytest

from lmlab.errors import ConfigError, DataError, ManifestMismatchError
from lmlab.lm import data, tokenizer


@pytest.fixture()
def text_dir(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(40):
        body = "the quick brown fox jumps over the lazy dog. " * (i % 5 + 1)
        (d / f"doc{i}.txt").write_text(f"document {i}: {body}")
    (d / "notes.jsonl").write_text("\n".join(json.dumps({"text": f"json line {i}"}) for i in range(10)) + "\n")
    (d / "image.bin").write_bytes(b"\x00\x01")
    return d


def test_read_texts_reads_text_files_and_jsonl(text_dir):
    texts = list(data.read_texts(text_dir))
    assert len(texts) == 50
    assert "json line 3" in texts


def test_read_texts_errors_are_one_clear_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(data.read_texts(tmp_path / "nope"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        list(data.read_texts(tmp_path / "bad.jsonl"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no text found"):
        list(data.read_texts(empty))


@pytest.mark.parametrize(("line", "match"), [
    ('{"text": null}', "is null, not a string"),
    ('{"text": ["a", "b"]}', r'is \["a", "b"\], not a string'),
    ('{"text": "a lone \\ud800 surrogate"}', "lone surrogate"),
])
def test_read_texts_rejects_jsonl_text_that_is_not_a_string(tmp_path, line, match):
    # these used to reach len() or the tokenizer and end in a traceback
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a fine line"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{match}"):
        list(data.read_texts(f))


def test_token_shards_round_trip_and_split(text_dir, tmp_path):
    tok = tokenizer.byte_tokenizer()
    texts = list(data.read_texts(text_dir))
    folders = data.build_token_shards(texts, tok, tmp_path / "tok", validation_fraction=0.2, shard_tokens=500)
    train, val = data.TokenShards(folders["train"], verify=True), data.TokenShards(folders["validation"])
    expected = sum(len(tok(t, add_special_tokens=False).input_ids) + 1 for t in texts)
    assert train.n_tokens + val.n_tokens == expected
    assert len(train.shards) > 1  # shard_tokens forces several shards
    assert 0 < val.manifest["documents"] < 50
    # the split is a function of the text: rebuilding gives the same validation set
    again = data.build_token_shards(texts[::-1], tok, tmp_path / "tok2", validation_fraction=0.2)
    assert data.TokenShards(again["validation"]).manifest["documents"] == val.manifest["documents"]
    # first tokens decode back to the first training document
    first = tok.decode(np.asarray(train.shards[0][:20]).tolist())
    assert first.startswith("document 0:") or first.startswith("document")


def test_sampling_is_a_pure_function_of_seed_step_micro(text_dir, tmp_path):
    tok = tokenizer.byte_tokenizer()
    f = data.build_token_shards(data.read_texts(text_dir), tok, tmp_path / "tok", shard_tokens=300)
    shards = data.TokenShards(f["train"])
    a = shards.sample(16, 4, seed=1, step=3, micro=0)
    b = shards.sample(16, 4, seed=1, step=3, micro=0)
    c = shards.sample(16, 4, seed=1, step=3, micro=1)
    assert (a.input_ids == b.input_ids).all() and not (a.input_ids == c.input_ids).all()
    assert (a.input_ids[:, 1:] == a.labels[:, :-1]).all()
    assert a.input_ids.shape == (4, 16)


def test_shards_refuse_another_tokenizer(text_dir, tmp_path):
    f = data.build_token_shards(data.read_texts(text_dir), tokenizer.byte_tokenizer(), tmp_path / "tok")
    other = tokenizer.train_bpe(data.read_texts(text_dir), vocab_size=300)
    with pytest.raises(ManifestMismatchError, match="another tokenizer"):
        data.TokenShards(f["train"]).check_tokenizer(other)


def test_corrupted_shard_is_detected(text_dir, tmp_path):
    f = data.build_token_shards(data.read_texts(text_dir), tokenizer.byte_tokenizer(), tmp_path / "tok")
    shard = sorted(f["train"].glob("*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum"):
        data.TokenShards(f["train"], verify=True)


def test_a_truncated_shard_is_refused_without_verify(text_dir, tmp_path):
    # its size is in the manifest, but nothing compared them: `lm train` on a shard cut to 100 bytes exited 0
    f = data.build_token_shards(data.read_texts(text_dir), tokenizer.byte_tokenizer(), tmp_path / "tok")
    shard = sorted(f["train"].glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=r"shard-00000.bin is missing or has the wrong size: 100 bytes.*lm tokenize"):
        data.TokenShards(f["train"])


@pytest.mark.parametrize("fraction", [-0.5, float("nan"), 1.0])
def test_a_validation_fraction_outside_0_1_is_refused(tmp_path, capsys, fraction):
    # -0.5 and nan tokenized everything into train and said nothing
    from lmlab.cli import main

    with pytest.raises(ConfigError, match=r"validation fraction must be in \[0, 1\)"):
        data.build_token_shards(["some text"], tokenizer.byte_tokenizer(), tmp_path, validation_fraction=fraction)
    assert main(["lm", "tokenize", "--data", str(tmp_path), "--tokenizer", "no-such-model", "--out",
                 str(tmp_path / "o"), "--validation-fraction", str(fraction)]) == 2  # before the tokenizer loads
    err = capsys.readouterr().err
    assert "validation fraction must be in [0, 1)" in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_a_rebuild_interrupted_between_its_two_renames_leaves_no_mix_of_builds(text_dir, tmp_path, monkeypatch):
    # validation/ moves into place before train/: an interrupt between the two left the new validation split beside
    # the old build's train split, both with valid manifests, and training used the mix without a word
    import os

    tok = tokenizer.byte_tokenizer()
    texts = list(data.read_texts(text_dir))
    data.build_token_shards(texts, tok, tmp_path / "tok", validation_fraction=0.2, source="old")
    real_replace = os.replace

    def interrupted(src, dst):
        if str(src).endswith("train"):  # validation/ has moved in; the old train/ is about to move aside
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.build_token_shards(texts[:30], tok, tmp_path / "tok", validation_fraction=0.2, source="new")
    monkeypatch.undo()
    assert data.TokenShards(tmp_path / "tok" / "validation").manifest["source"] == "new"
    with pytest.raises(DataError, match="did not finish"):
        data.TokenShards(tmp_path / "tok" / "train")


def test_shards_never_replace_a_split_folder_holding_other_files(tmp_path, capsys):
    """`lmlab lm tokenize --data DIR --out DIR` with the text in DIR/train: the text was deleted by the build."""
    from lmlab.cli import main

    root = tmp_path / "mydata"
    (root / "train").mkdir(parents=True)
    (root / "train" / "a.txt").write_text("some text to keep " * 50)
    code = main(["lm", "tokenize", "--data", str(root), "--tokenizer", "tiny:micro", "--out", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and "not token shards" in err and len(err.strip().splitlines()) == 1, err
    assert (root / "train" / "a.txt").is_file() and not (root / "validation").exists()
    out = tmp_path / "shards"  # an earlier build, even one whose manifest a rebuild retired, is replaced
    tok = tokenizer.byte_tokenizer()
    data.build_token_shards(["text " * 40] * 20, tok, out, validation_fraction=0.2)
    (out / "train" / "manifest.json").unlink()
    data.build_token_shards(["other " * 40] * 20, tok, out, validation_fraction=0.2)
    assert data.TokenShards(out / "train").manifest["documents"] > 0

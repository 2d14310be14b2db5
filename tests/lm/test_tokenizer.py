import pytest

from lmlab.errors import ConfigError, DataError
from lmlab.lm import tokenizer

TEXT = "Byte-level BPE never meets an unknown character: naïve café, 東京, emoji 🙂."


def test_byte_tokenizer_round_trips_any_text():
    tok = tokenizer.byte_tokenizer()
    ids = tok(TEXT).input_ids
    assert tok.decode(ids) == TEXT
    assert len(tok) == 258 and max(ids) < 256
    assert tok.eos_token_id == 256 and tok.pad_token_id == 257


def test_trained_bpe_compresses_and_round_trips(tmp_path):
    corpus = ["the cat sat on the mat while the dog sat on the log. " * 20] * 10
    tok = tokenizer.train_bpe(corpus, vocab_size=400, out_dir=tmp_path / "tok")
    assert tok.decode(tok(TEXT).input_ids) == TEXT
    assert len(tok(corpus[0]).input_ids) < len(corpus[0]) / 3
    again = tokenizer.load(tmp_path / "tok")
    assert again(corpus[0]).input_ids == tok(corpus[0]).input_ids
    assert again.eos_token == tokenizer.EOS


def test_bad_requests_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        tokenizer.train_bpe(["x"], vocab_size=10)
    with pytest.raises(ConfigError, match=r"vocab_size must be in \[258, 16777216\]"):  # `tokenizers` aborted (rc 134)
        tokenizer.train_bpe(["x"], vocab_size=99_999_999_999)  # allocating 4.5 TB
    with pytest.raises(DataError, match="no text"):
        tokenizer.train_bpe([], vocab_size=300)
    with pytest.raises(DataError, match="does not exist"):
        tokenizer.load(tmp_path / "missing")


def test_one_string_is_refused_not_trained_on_its_characters():
    # a bare string used to be iterated character by character: a tokenizer with no merges, silently
    with pytest.raises(ConfigError, match="not one string"):
        tokenizer.train_bpe("the cat sat on the mat " * 50, vocab_size=300)


@pytest.mark.parametrize("bad, words", [(b"bytes", "text 1 is a bytes"), (5, "text 1 is a int"),
                                        ("lone \ud800 surrogate", "text 1 is not valid Unicode")])
def test_texts_that_are_not_valid_strings_are_data_errors(bad, words):
    with pytest.raises(DataError, match=words):
        tokenizer.train_bpe(["fine text", bad], vocab_size=300)


@pytest.mark.parametrize("content", [None, "{not json"])
def test_a_folder_without_a_loadable_tokenizer_is_a_data_error(tmp_path, content):
    if content is not None:
        (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(DataError, match="holds no loadable tokenizer"):
        tokenizer.load(tmp_path)


def test_a_folder_holding_other_files_is_not_replaced_by_the_tokenizer(tmp_path):
    # `lmlab lm tokenizer --data corpus --out corpus`: the folder was swapped for the tokenizer's, deleting the texts
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "doc.txt").write_text("the cat sat on the mat " * 50)
    with pytest.raises(ConfigError, match="holds files that are not a tokenizer"):
        tokenizer.train_bpe(["the cat sat on the mat " * 50], vocab_size=300, out_dir=tmp_path / "corpus")
    assert (tmp_path / "corpus" / "doc.txt").is_file()
    # a tokenizer folder (or an empty one) is replaced
    tokenizer.save(tokenizer.byte_tokenizer(), tmp_path / "tok")
    (tmp_path / "empty").mkdir()
    for folder in ("tok", "empty"):
        trained = tokenizer.train_bpe(["the cat sat on the mat " * 50], vocab_size=300, out_dir=tmp_path / folder)
        assert len(tokenizer.load(tmp_path / folder)) == len(trained) > 258

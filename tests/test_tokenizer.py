"""Offline WordPiece tokenizers: the real bert-base-uncased vocab, size checks, and a trained vocab."""

from __future__ import annotations

from pathlib import Path

import pytest

from gram.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_wordpiece_vocab

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BERT_VOCAB = SHARED / "data" / "bert-base-uncased" / "vocab.txt"

TEXTS = [
    "A small red circle moves left while a low tone beeps",
    "the large BLUE square slides to the right",
    "beep beep beep, what a high sound",
    "a green triangle rises to rapid buzzing beeps",
] * 5


@pytest.fixture(scope="module")
def trained_vocab(tmp_path_factory):
    return train_wordpiece_vocab(TEXTS, tmp_path_factory.mktemp("vocab"), vocab_size=200)


@pytest.mark.skipif(not BERT_VOCAB.is_file(), reason=f"{BERT_VOCAB} not present")
def test_bert_base_uncased_vocab_loads_with_known_ids():
    tokenizer = load_tokenizer(BERT_VOCAB.parent, expected_size=30522)
    assert len(tokenizer) == 30522
    expected = [101, 1037, 2158, 2003, 2652, 1996, 2858, 102]  # [CLS] a man is playing the guitar [SEP]
    assert tokenizer("A man is playing the guitar")["input_ids"] == expected
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 100)


@pytest.mark.skipif(not BERT_VOCAB.is_file(), reason=f"{BERT_VOCAB} not present")
def test_wrong_expected_size_raises_naming_the_file():
    with pytest.raises(ValueError, match="vocab.txt.*30522.*expected 1000"):
        load_tokenizer(BERT_VOCAB, expected_size=1000)


def test_missing_vocab_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "vocab.txt")):
        load_tokenizer(tmp_path)


def test_duplicate_lines_are_detected(tmp_path, trained_vocab):
    lines = trained_vocab.read_text(encoding="utf-8").splitlines()
    (tmp_path / "vocab.txt").write_text("\n".join(lines + [lines[-1]]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{len(lines)} entries but the file has {len(lines) + 1} lines"):
        load_tokenizer(tmp_path)


def test_trained_vocab_has_bert_special_tokens_first(trained_vocab):
    lines = trained_vocab.read_text(encoding="utf-8").splitlines()
    assert tuple(lines[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS
    assert len(lines) == len(set(lines)) <= 200
    tokenizer = load_tokenizer(trained_vocab)
    assert len(tokenizer) == len(lines)
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 2, 3)


def test_trained_vocab_round_trips_lowercased_text(trained_vocab):
    tokenizer = load_tokenizer(trained_vocab.parent)
    for text in TEXTS[:4]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()
    # A word never seen still splits into known characters instead of [UNK].
    assert tokenizer.tokenize("tile") == ["t", "##i", "##l", "##e"]


def test_training_is_deterministic(trained_vocab, tmp_path):
    again = train_wordpiece_vocab(TEXTS, tmp_path, vocab_size=200)
    assert again.read_bytes() == trained_vocab.read_bytes()


def test_vocab_size_too_small_raises(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=10"):
        train_wordpiece_vocab(TEXTS, tmp_path, vocab_size=10)

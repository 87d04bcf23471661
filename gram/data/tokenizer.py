"""Offline BERT WordPiece tokenizers: load a ``vocab.txt`` safely, or train a small one.

transformers 5 has silent traps here: ``BertTokenizer(vocab_file=...)`` and an offline
``from_pretrained('bert-base-uncased')`` both quietly build a 5-token vocabulary, so every
word becomes ``[UNK]`` and training still "works". :func:`load_tokenizer` therefore passes the
vocabulary the way that is honoured (``vocab=``) and checks the size it got against the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizer, PreTrainedTokenizerBase

VOCAB_FILENAME = "vocab.txt"
# BERT order: [PAD]=0 so that zero-padding is padding, then the rest as in bert-base's ordering.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BERT_BASE_UNCASED_VOCAB_SIZE = 30522


def resolve_vocab_file(path: str | Path) -> Path:
    """Return the ``vocab.txt`` for ``path`` (a directory holding one, or the file itself)."""
    path = Path(path).expanduser()
    vocab_file = path / VOCAB_FILENAME if path.is_dir() else path
    if not vocab_file.is_file():
        raise FileNotFoundError(
            f"WordPiece vocabulary not found: {vocab_file}. Pass a directory containing "
            f"{VOCAB_FILENAME} or the file itself (bert-base-uncased's vocab.txt goes under "
            "pretrained_weights/, see its README; the sample dataset writes one to "
            "data/sample/tokenizer/)."
        )
    return vocab_file


def count_vocab_lines(vocab_file: Path) -> int:
    """Number of entries in a WordPiece vocab file: one token per line, trailing newline optional."""
    with vocab_file.open(encoding="utf-8") as handle:
        return sum(1 for _ in handle)


def load_tokenizer(
    path: str | Path, expected_size: int | None = None, lowercase: bool = True
) -> PreTrainedTokenizerBase:
    """Load a BERT WordPiece tokenizer from a ``vocab.txt`` without touching the network.

    Args:
        path: directory containing ``vocab.txt``, or the vocab file itself.
        expected_size: if given, the vocabulary must have exactly this many entries
            (30522 for bert-base-uncased).
        lowercase: lower-case and strip accents before WordPiece (the uncased models).

    Raises:
        FileNotFoundError: no vocab file at ``path``.
        ValueError: the loaded vocabulary size differs from the file's line count (a
            duplicated line or a silently ignored file) or from ``expected_size``.
    """
    vocab_file = resolve_vocab_file(path)
    # ``vocab=`` (not ``vocab_file=``, which transformers 5 silently ignores) reads the file.
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=lowercase)
    n_lines = count_vocab_lines(vocab_file)
    if len(tokenizer) != n_lines:
        raise ValueError(
            f"Tokenizer built from {vocab_file} has {len(tokenizer)} entries but the file has "
            f"{n_lines} lines; the file has duplicate/blank lines or was not read. Regenerate it "
            "(train_wordpiece_vocab) or fetch a clean vocab.txt."
        )
    if expected_size is not None and n_lines != expected_size:
        raise ValueError(
            f"Vocabulary {vocab_file} has {n_lines} entries, expected {expected_size}; point the "
            "tokenizer path at the vocab.txt that matches the text encoder (or fix expected_size)."
        )
    return tokenizer


def build_wordpiece_tokenizer() -> Tokenizer:
    """An untrained BERT-uncased pipeline: BertNormalizer (lowercase) + BertPreTokenizer + WordPiece."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def count_words(tokenizer: Tokenizer, texts: list[str]) -> Counter[str]:
    """Word frequencies after the tokenizer's own normalizer and pre-tokenizer."""
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text)
        counts.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def canonical_vocab(trained: Iterable[str], word_counts: Counter[str], vocab_size: int) -> list[str]:
    """Keep the tie-independent part of a trained vocabulary, in a fixed order.

    ``WordPieceTrainer`` is not deterministic: on equal pair counts its merge order depends on
    hash-map iteration (huggingface/tokenizers#1794), so the intermediate sub-words differ from
    run to run. Its characters (``a``, ``##a``) and, once merging has run to completion, its
    whole words do not; those are kept: specials, characters, then words by (-count, word).
    """
    trained = set(trained) - set(SPECIAL_TOKENS)
    chars = sorted(tok for tok in trained if len(tok) == 1 or (tok.startswith("##") and len(tok) == 3))
    words = sorted(
        (w for w in word_counts if w in trained and len(w) > 1), key=lambda w: (-word_counts[w], w)
    )
    vocab = [*SPECIAL_TOKENS, *chars]
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the {len(vocab)} special and character tokens; raise it."
        )
    return vocab + words[: vocab_size - len(vocab)]


def train_wordpiece_vocab(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000) -> Path:
    """Train a lowercase BERT WordPiece vocabulary on ``texts`` and write ``out_dir/vocab.txt``.

    The five special tokens take ids 0-4 in BERT order ([PAD] first), then every character
    (plain and ``##``-continuation, so no word is ever [UNK]), then the most frequent whole words
    up to ``vocab_size``. Deterministic: the same texts give a byte-identical file.

    Returns:
        Path of the written ``vocab.txt`` (loadable by :func:`load_tokenizer`).
    """
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError(f"train_wordpiece_vocab got no non-empty texts for {out_dir}.")
    tokenizer = build_wordpiece_tokenizer()
    word_counts = count_words(tokenizer, texts)
    # Room for every possible merge, so merging runs until each word is one token (see
    # canonical_vocab): each word of n characters needs at most n - 1 merges.
    n_chars = len({char for word in word_counts for char in word})
    max_size = len(SPECIAL_TOKENS) + 2 * n_chars + sum(len(word) - 1 for word in word_counts)
    trainer = trainers.WordPieceTrainer(
        vocab_size=max_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    vocab = canonical_vocab(tokenizer.get_vocab(), word_counts, vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / VOCAB_FILENAME
    vocab_file.write_text("".join(token + "\n" for token in vocab), encoding="utf-8")
    return vocab_file

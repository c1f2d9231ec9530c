"""A lower-casing WordPiece tokenizer whose vocabulary is learned locally (nothing is downloaded)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from biofm.modalities.text.wordpiece import learn_vocabulary

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2) -> Tokenizer:
    """A lower-casing WordPiece tokenizer (`tokenizers`' BERT normaliser and pre-tokeniser) whose vocabulary
    is learned here, deterministically (`wordpiece.learn_vocabulary`); nothing is downloaded."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text, n in Counter(t for t in texts if t).items():  # texts repeat (EHR strings): each split once
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            words[word] += n
    vocab = learn_vocabulary(words, vocab_size, min_frequency, SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer

"""Data for pyllm: file readers, the embedded stdlib corpus, tokenizers, features, collators."""

from .collate import IGNORE_INDEX, MLMCollator, PackedCollator, PadCollator, mask_tokens, pack_blocks, pad_batch
from .features import classification_features, document_features, lm_features, qa_features, token_classification_features
from .noising import (SpanCorruptionCollator, TextInfillingCollator, random_spans_noise_mask, seq2seq_lm_features,
                      span_corruption_lengths, span_corruption_specials, text_infilling_specials)
from .files import DataError, read_conll, read_labelled, read_squad, read_texts
from .stdlib import cache_dir, stdlib_corpus, stdlib_records, stdlib_topics
from .tokenizer import Tokenizer, load_tokenizer, train_bpe, train_tokenizer, train_wordpiece

__all__ = [
    "IGNORE_INDEX", "MLMCollator", "PackedCollator", "PadCollator", "mask_tokens", "pack_blocks", "pad_batch",
    "classification_features", "document_features", "lm_features", "qa_features", "token_classification_features",
    "SpanCorruptionCollator", "TextInfillingCollator", "random_spans_noise_mask", "seq2seq_lm_features",
    "span_corruption_lengths", "span_corruption_specials", "text_infilling_specials",
    "DataError", "read_conll", "read_labelled", "read_squad", "read_texts",
    "cache_dir", "stdlib_corpus", "stdlib_records", "stdlib_topics",
    "Tokenizer", "load_tokenizer", "train_bpe", "train_tokenizer", "train_wordpiece",
]

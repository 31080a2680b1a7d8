"""Tokenizers: train a byte-level BPE (GPT) or WordPiece (BERT) one, or load one.

A thin wrapper around the Rust ``tokenizers`` library. It keeps what training
needs in one place -- the special token ids, the vocabulary size, truncation of
single texts and pairs, and the character offsets that extractive QA uses to
map answer spans onto tokens -- and saves/loads ``tokenizer.json`` in a model
folder, the file Hugging Face reads too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class Tokenizer:
    """A trained tokenizer plus the facts about it that the data pipeline needs.

    ``kind`` is ``"bpe"`` (causal LMs: no special tokens added, ``eos_id`` separates
    documents and pads) or ``"wordpiece"`` (BERT: ``[CLS] a [SEP] b [SEP]``,
    ``mask_id`` for MLM).
    """

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        tok.no_truncation()
        tok.no_padding()
        vocab = tok.get_vocab()
        self.kind = "wordpiece" if isinstance(tok.model, models.WordPiece) else "bpe"
        self.pad_id = self._first(vocab, "[PAD]", "<pad>", EOS)
        self.mask_id = self._first(vocab, "[MASK]", "<mask>")
        self.cls_id = self._first(vocab, "[CLS]", "<s>")
        self.sep_id = self._first(vocab, "[SEP]", "</s>")
        self.eos_id = self._first(vocab, EOS, "</s>", "[SEP]")
        self.unk_id = self._first(vocab, "[UNK]", "<unk>")
        # Ids the MLM collator must never mask or replace.
        self.special_ids = sorted(
            {i for i in (self.pad_id, self.mask_id, self.cls_id, self.sep_id, self.eos_id, self.unk_id)
             if i is not None}
        )
        if self.pad_id is None:
            raise ValueError("Tokenizer: the vocabulary has no padding token ([PAD], <pad> or <|endoftext|>)")

    @staticmethod
    def _first(vocab, *names):
        for n in names:
            if n in vocab:
                return vocab[n]
        return None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    # -- encoding ---------------------------------------------------------------

    def encode(
        self,
        texts: Sequence,
        pairs: Sequence[str] | None = None,
        *,
        max_length: int | None = None,
        truncation: str = "longest_first",
        is_pretokenized: bool = False,
        add_special_tokens: bool = True,
    ) -> list[tokenizers.Encoding]:
        """Encode a batch; each Encoding has ``ids``, ``type_ids``, ``offsets``,
        ``word_ids`` and ``sequence_ids``. ``truncation="only_second"`` cuts only
        the second text of each pair (the QA context)."""
        if max_length is not None:
            self.tok.enable_truncation(max_length, strategy=truncation)
        try:
            inputs = list(texts) if pairs is None else list(zip(texts, pairs))
            return self.tok.encode_batch(inputs, is_pretokenized=is_pretokenized, add_special_tokens=add_special_tokens)
        finally:
            self.tok.no_truncation()

    def __call__(self, texts, pairs=None, *, max_length: int | None = None):
        """Encode and pad: ``{"input_ids", "attention_mask", "token_type_ids"}``, (batch, seq) LongTensors."""
        from .collate import pad_batch

        if isinstance(texts, str):
            texts = [texts]
        encs = self.encode(texts, pairs, max_length=max_length)
        return pad_batch([{"input_ids": e.ids, "token_type_ids": e.type_ids} for e in encs], self.pad_id)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- files ------------------------------------------------------------------

    def save(self, folder) -> None:
        """Write ``tokenizer.json`` (and ``tokenizer_config.json`` so Hugging Face's
        ``AutoTokenizer`` can read the folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        vocab = {v: k for k, v in self.tok.get_vocab().items()}
        name = lambda i: None if i is None else vocab[i]  # noqa: E731
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000}
        if self.kind == "wordpiece":
            cfg.update(pad_token=name(self.pad_id), unk_token=name(self.unk_id), cls_token=name(self.cls_id),
                       sep_token=name(self.sep_id), mask_token=name(self.mask_id))
        else:
            cfg.update(bos_token=name(self.eos_id), eos_token=name(self.eos_id), pad_token=name(self.pad_id))
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """Load ``tokenizer.json`` from a model folder (or a BERT ``vocab.txt`` alone)."""
        folder = Path(folder)
        if folder.is_file() and folder.suffix == ".json":
            return cls(tokenizers.Tokenizer.from_file(str(folder)))
        if (folder / "tokenizer.json").is_file():
            return cls(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
        if (folder / "vocab.txt").is_file():
            lower = True
            cfg = folder / "tokenizer_config.json"
            if cfg.is_file():
                lower = json.loads(cfg.read_text()).get("do_lower_case", True)
            bert = tokenizers.BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)
            return cls(bert._tokenizer)
        raise FileNotFoundError(f"Tokenizer.from_folder: {folder} has neither tokenizer.json nor vocab.txt")


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2) -> Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer with one special token, ``<|endoftext|>`` (id 0)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8192, *, lowercase: bool = True) -> Tokenizer:
    """A BERT WordPiece tokenizer: ``[PAD]=0 [UNK] [CLS] [SEP] [MASK]``, ``[CLS] a [SEP] b [SEP]`` templates."""
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return Tokenizer(tok)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    if kind == "wordpiece":
        return train_wordpiece(texts, vocab_size)
    raise ValueError(f"train_tokenizer: kind must be 'bpe' or 'wordpiece', got {kind!r}")

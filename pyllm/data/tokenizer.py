"""The tokenizer: one class over the Rust ``tokenizers`` library, with transformers' names.

``load_tokenizer(folder)`` reads the folders pyllm writes and Hugging Face model folders
(``tokenizer.json``; a BERT ``vocab.txt``; a GPT-2 ``vocab.json`` + ``merges.txt``), taking the
special tokens from ``tokenizer_config.json`` / ``special_tokens_map.json`` where the folder names
them and from the vocabulary (``[PAD]``, ``<|endoftext|>`` ...) where it does not.
``train_bpe`` (GPT: byte-level BPE) and ``train_wordpiece`` (BERT) train one on texts.

The :class:`Tokenizer` answers to transformers' names: ``tokenizer(texts)`` returns padded
``input_ids`` / ``attention_mask`` / ``token_type_ids`` LongTensors of shape (batch, seq), ready for
``model(**batch)``; ``pad_token_id`` (EOS pads when there is no pad token, as for GPT-2),
``decode``, ``batch_decode``, ``save_pretrained``. The data pipeline uses ``encode_batch``, which
keeps what features need: offsets (QA answer spans), word ids (tagging) and sequence ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIAL_NAMES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token")
# When a folder does not name a special token, these vocabulary entries are it (first found wins).
_VOCAB_SPECIALS = {
    "pad_token": ("[PAD]", "<pad>"), "unk_token": ("[UNK]", "<unk>"), "cls_token": ("[CLS]", "<s>"),
    "sep_token": ("[SEP]", "</s>"), "mask_token": ("[MASK]", "<mask>"), "bos_token": (EOS,),
    "eos_token": (EOS, "</s>"),
}


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus its special tokens, called the way transformers' are.

    Attributes: ``vocab_size`` (also ``len(tokenizer)``), ``model_max_length`` (None = no limit),
    ``padding_side``, ``all_special_ids``, and ``<name>_token`` / ``<name>_token_id`` for pad, unk,
    cls, sep, mask, bos, eos (None where the tokenizer has none). Without a pad token the EOS
    token pads.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, special_tokens: Optional[dict] = None,
                 model_max_length: Optional[int] = None, padding_side: str = "right"):
        self._tok = tokenizer
        self._tok.no_padding()  # padding is done here, per call (tokenizer.json may carry fixed padding)
        self._tok.no_truncation()
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        vocab = tokenizer.get_vocab()
        given = special_tokens or {}
        for name in SPECIAL_NAMES:
            token = given.get(name)
            if token is None or token not in vocab:
                token = next((t for t in _VOCAB_SPECIALS[name] if t in vocab), None)
            setattr(self, name, token)
            setattr(self, name + "_id", vocab[token] if token is not None else None)
        if self.pad_token_id is None and self.eos_token_id is not None:
            self.pad_token, self.pad_token_id = self.eos_token, self.eos_token_id
        # Ids the MLM collator never masks or replaces.
        self.all_special_ids = sorted({getattr(self, n + "_id") for n in SPECIAL_NAMES} - {None})

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, text_pair: Optional[str] = None, add_special_tokens: bool = True) -> list[int]:
        """The ids of one text (or pair), no padding, no truncation."""
        return self._tok.encode(text, text_pair, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence, pairs: Optional[Sequence[str]] = None, *,
                     max_length: Optional[int] = None, truncation: str = "longest_first",
                     is_pretokenized: bool = False, add_special_tokens: bool = True) -> list[tokenizers.Encoding]:
        """Encode a batch, unpadded; each ``tokenizers.Encoding`` has ``ids``, ``type_ids``, ``offsets``,
        ``word_ids`` and ``sequence_ids``. ``truncation="only_second"`` cuts only the second text of
        each pair (the QA context)."""
        if max_length is not None:
            self._tok.enable_truncation(max_length, strategy=truncation)
        try:
            inputs = list(texts) if pairs is None else list(zip(texts, pairs))
            return self._tok.encode_batch(inputs, is_pretokenized=is_pretokenized,
                                          add_special_tokens=add_special_tokens)
        finally:
            self._tok.no_truncation()

    def __call__(self, texts: Union[str, Sequence[str]], text_pair: Union[str, Sequence[str], None] = None,
                 padding: Union[bool, str] = True, truncation: bool = True, max_length: Optional[int] = None,
                 padding_side: Optional[str] = None, add_special_tokens: bool = True) -> dict:
        """Tokenize a text or a batch -> {input_ids, attention_mask, token_type_ids}, each (B, N) int64.

        padding: True / "longest" (to the longest row), "max_length" (to max_length), False (rows must
        then have equal lengths). truncation: cut to max_length (default model_max_length), pairs
        longest-first. padding_side: "right" (default; BERT) or "left" (GPT generation). An empty
        batch gives (0, 0) tensors.
        """
        texts, text_pair = _as_batch(texts, "texts"), _as_batch(text_pair, "text_pair")
        if text_pair is not None and len(text_pair) != len(texts):
            raise ValueError(f"tokenizer: text_pair has {len(text_pair)} texts but texts has {len(texts)}")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"tokenizer: padding_side must be 'left' or 'right', got {side!r}")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"tokenizer: padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        limit = max_length if max_length is not None else self.model_max_length
        if padding == "max_length" and limit is None:
            raise ValueError("tokenizer: padding='max_length' needs max_length (the folder sets no model_max_length)")
        encs = self.encode_batch(texts, text_pair, max_length=limit if truncation else None,
                                 add_special_tokens=add_special_tokens)
        lengths = [len(e.ids) for e in encs]
        if padding in (False, "do_not_pad") and len(set(lengths)) > 1:
            raise ValueError(f"tokenizer: padding=False but the rows have different lengths {lengths}; "
                             f"pass padding=True")
        width = max(lengths, default=0)
        if padding == "max_length":
            width = max(limit, width)
        ids = torch.full((len(encs), width), self.pad_token_id if self.pad_token_id is not None else 0,
                         dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        types = torch.zeros((len(encs), width), dtype=torch.long)
        for i, e in enumerate(encs):
            n = len(e.ids)
            cols = slice(width - n, width) if side == "left" else slice(0, n)
            ids[i, cols] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, cols] = 1
            types[i, cols] = torch.tensor(e.type_ids, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """One sequence of ids (list or 1-D tensor) -> text."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"tokenizer.decode: expected one sequence (1-D), got shape {tuple(ids.shape)}; "
                                 f"use batch_decode")
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return self._tok.decode_batch([list(b) for b in batch], skip_special_tokens=skip_special_tokens)

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    # -- files ----------------------------------------------------------------------------------

    def save_pretrained(self, folder) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (the special tokens; transformers'
        ``AutoTokenizer`` reads the folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
               "model_max_length": self.model_max_length or 1_000_000_000, "padding_side": self.padding_side}
        cfg.update({n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n) is not None})
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _as_batch(texts, name: str):
    """A text or a list of texts -> a list (None stays None), or a clear TypeError."""
    if texts is None or isinstance(texts, str):
        return texts if texts is None else [texts]
    if isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts):
        return list(texts)
    raise TypeError(f"tokenizer: {name} must be a str or a list of str, got {type(texts).__name__}"
                    + (f" holding {sorted({type(t).__name__ for t in texts})}" if isinstance(texts, (list, tuple))
                       else ""))


# -- loading ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _wordpiece_from_vocab(vocab: Path, lowercase: bool, special: dict) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.WordPiece.from_file(str(vocab), unk_token=special.get("unk_token", "[UNK]")))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = special.get("cls_token", "[CLS]"), special.get("sep_token", "[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    names = set(special.values()) | set(BERT_SPECIALS)
    tok.add_special_tokens(sorted(t for t in names if tok.token_to_id(t) is not None))
    return tok


def _bytelevel_bpe(vocab: Path, merges: Path, special: dict) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([t for t in special.values() if tok.token_to_id(t) is not None])
    return tok


def load_tokenizer(folder) -> Tokenizer:
    """The tokenizer of a model folder: ``tokenizer.json``, a BERT ``vocab.txt``, or a GPT-2
    ``vocab.json`` + ``merges.txt`` (or a ``tokenizer.json`` file given directly)."""
    path = Path(folder)
    if path.is_file() and path.suffix == ".json":
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path)))
    if not path.is_dir():
        raise FileNotFoundError(f"load_tokenizer: {path} is not a folder")
    cfg = _read_json(path / "tokenizer_config.json")
    special = {}
    for source in (cfg, _read_json(path / "special_tokens_map.json")):
        for name in SPECIAL_NAMES:
            value = source.get(name)
            if isinstance(value, dict):  # {"content": "[PAD]", ...}
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
    if (path / "tokenizer.json").exists():
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.txt").exists():
        tok = _wordpiece_from_vocab(path / "vocab.txt", bool(cfg.get("do_lower_case", True)), special)
    elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
        tok = _bytelevel_bpe(path / "vocab.json", path / "merges.txt", special)
    else:
        spm = sorted(p.name for p in path.iterdir() if p.suffix in (".model", ".spm"))
        if spm:  # T5 (spiece.model) and Marian (source.spm / target.spm) folders without tokenizer.json
            raise FileNotFoundError(f"load_tokenizer: {path} holds only SentencePiece models {spm} and no "
                                    f"tokenizer.json; pyllm reads tokenizer.json. Where transformers has a fast "
                                    f"tokenizer for the model (T5 does, Marian does not) write one once with "
                                    f"AutoTokenizer.from_pretrained(folder).save_pretrained(folder) (needs the "
                                    f"sentencepiece and protobuf packages)")
        raise FileNotFoundError(f"load_tokenizer: {path} holds no tokenizer.json, vocab.txt or "
                                f"vocab.json + merges.txt")
    max_len = cfg.get("model_max_length")
    if not isinstance(max_len, int) or max_len > 1_000_000:  # transformers writes a huge sentinel for "none"
        max_len = None
    return Tokenizer(tok, special, model_max_length=max_len, padding_side=cfg.get("padding_side", "right"))


# -- training --------------------------------------------------------------------------------------


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2,
              special_tokens: Sequence[str] = ()) -> Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer with one special token, ``<|endoftext|>`` (id 0), plus
    ``special_tokens`` appended after the learned vocabulary, in order (e.g. ``<pad>``, ``<mask>``, T5's
    sentinels: :mod:`pyllm.data.noising`)."""
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
    if special_tokens:
        tok.add_special_tokens(list(special_tokens))
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

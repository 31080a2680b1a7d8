"""Tokenizers from Hugging Face model folders, through the `tokenizers` library (no transformers).

`load_tokenizer(folder)` reads tokenizer.json if present, else builds a BERT WordPiece tokenizer
from vocab.txt, or a GPT-2 byte-level BPE from vocab.json + merges.txt. Special tokens come from
special_tokens_map.json / tokenizer_config.json. Calling the wrapper returns LongTensors ready
for the models: `model(**tokenizer(texts))`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

_SPECIAL_NAMES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with transformers-style batching.

    Attributes: vocab_size, model_max_length, padding_side, and <name>_token / <name>_token_id for
    pad, unk, cls, sep, mask, bos, eos (None where the folder defines none). Without a pad token
    (GPT-2) the EOS token pads.
    """

    def __init__(self, tokenizer, special_tokens: dict, model_max_length: Optional[int] = None,
                 padding_side: str = "right"):
        self._tok = tokenizer
        self._tok.no_padding()  # padding is done here, per call (tokenizer.json may carry fixed padding)
        self._tok.no_truncation()
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        for name in _SPECIAL_NAMES:
            token = special_tokens.get(name)
            setattr(self, name, token)
            setattr(self, name + "_id", self._tok.token_to_id(token) if token is not None else None)
        if self.pad_token_id is None and self.eos_token_id is not None:
            self.pad_token, self.pad_token_id = self.eos_token, self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, text_pair: Optional[str] = None, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, text_pair, add_special_tokens=add_special_tokens).ids

    def __call__(self, texts: Union[str, Sequence[str]], text_pair: Union[str, Sequence[str], None] = None,
                 padding: Union[bool, str] = True, truncation: bool = True, max_length: Optional[int] = None,
                 padding_side: Optional[str] = None, add_special_tokens: bool = True) -> dict:
        """Tokenize a text or a batch -> {input_ids, attention_mask, token_type_ids}, each (B, N) int64.

        padding: True / "longest" (to the longest row), "max_length" (to max_length), False (rows must
        then have equal lengths). truncation: cut to max_length (default model_max_length), pairs
        longest-first. padding_side: "right" (default; BERT) or "left" (GPT generation).
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(text_pair, str):
            text_pair = [text_pair]
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
        if truncation and limit is not None:
            self._tok.enable_truncation(limit, strategy="longest_first")
        else:
            self._tok.no_truncation()
        inputs = list(zip(texts, text_pair)) if text_pair is not None else list(texts)
        encs = self._tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
        self._tok.no_truncation()
        lengths = [len(e.ids) for e in encs]
        if padding in (False, "do_not_pad"):
            if len(set(lengths)) > 1:
                raise ValueError(f"tokenizer: padding=False but the rows have different lengths {lengths}; "
                                 f"pass padding=True")
            width = lengths[0]
        else:
            width = max(lengths) if padding in (True, "longest") else max(limit, max(lengths))
        pad_id = self.pad_token_id if self.pad_token_id is not None else 0
        ids = torch.full((len(encs), width), pad_id, dtype=torch.long)
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


def _wordpiece_from_vocab(vocab: Path, lowercase: bool, special: dict):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors
    tok = HFTokenizer(models.WordPiece.from_file(str(vocab), unk_token=special.get("unk_token", "[UNK]")))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = special.get("cls_token", "[CLS]"), special.get("sep_token", "[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    tok.add_special_tokens([t for t in special.values() if tok.token_to_id(t) is not None])
    return tok


def _bytelevel_bpe(vocab: Path, merges: Path, special: dict):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([t for t in special.values() if tok.token_to_id(t) is not None])
    return tok


def load_tokenizer(folder) -> Tokenizer:
    """Tokenizer of a Hugging Face model folder (tokenizer.json, vocab.txt, or vocab.json + merges.txt)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"load_tokenizer: {folder} is not a folder")
    cfg = _read_json(folder / "tokenizer_config.json")
    special = {}
    for source in (cfg, _read_json(folder / "special_tokens_map.json")):
        for name in _SPECIAL_NAMES:
            value = source.get(name)
            if isinstance(value, dict):  # {"content": "[PAD]", ...}
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.txt").exists():
        tok = _wordpiece_from_vocab(folder / "vocab.txt", bool(cfg.get("do_lower_case", True)), special)
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        tok = _bytelevel_bpe(folder / "vocab.json", folder / "merges.txt", special)
    else:
        spm = sorted(p.name for p in folder.iterdir() if p.suffix in (".model", ".spm"))
        if spm:  # T5 (spiece.model) and Marian (source.spm / target.spm) folders without tokenizer.json
            raise FileNotFoundError(f"load_tokenizer: {folder} holds only SentencePiece models {spm} and no "
                                    f"tokenizer.json; pyllm reads tokenizer.json. Where transformers has a fast tokenizer for the "
                                    f"model (T5 does, Marian does not) write one once with "
                                    f"AutoTokenizer.from_pretrained(folder).save_pretrained(folder) (needs the "
                                    f"sentencepiece and protobuf packages)")
        raise FileNotFoundError(f"load_tokenizer: {folder} holds no tokenizer.json, vocab.txt or "
                                f"vocab.json + merges.txt")
    max_len = cfg.get("model_max_length")
    if not isinstance(max_len, int) or max_len > 1_000_000:  # transformers writes a huge sentinel for "none"
        max_len = None
    return Tokenizer(tok, special, model_max_length=max_len, padding_side=cfg.get("padding_side", "right"))

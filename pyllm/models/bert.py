"""BERT: a post-norm bidirectional encoder, and its task heads.

Same calling convention as transformers' Bert* classes: `model(input_ids, attention_mask=None,
token_type_ids=None, labels=None)`; `attention_mask` (B, N) with 1 = real token, 0 = padding.
Checkpoints: `BertModel.from_pretrained(folder)` reads Hugging Face BERT folders (hf_io.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyllm.nn import LayerNorm

from .base import (BaseModelOutput, MaskedLMOutput, PreTrainedModel, QuestionAnsweringOutput,
                   SequenceClassifierOutput, TokenClassifierOutput, check_class_labels, check_inputs,
                   check_labels, classification_loss, padding_mask)
from .block import BlockStack, activation_fn
from .config import TransformerConfig


class BertEmbeddings(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        self.norm = LayerNorm(config.hidden_size, eps=config.norm_eps, backend=config.backend)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        B, N = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(N, device=input_ids.device)[None]  # (1, N)
        x = self.word(input_ids) + self.position(position_ids)  # (B, N, C)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class BertModel(PreTrainedModel):
    """Embeddings (word + position + token type, LayerNorm) -> post-norm blocks -> optional pooler.

    forward -> BaseModelOutput(last_hidden_state (B, N, C), pooler_output (B, C) or None)
    """

    family = "bert"
    default_norm_position = "post"

    def __init__(self, config: TransformerConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        config = self.config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BlockStack(config, causal=False, pre_norm=config.norm_position == "pre")
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        check_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids, who=type(self).__name__)
        if token_type_ids is not None and self.config.type_vocab_size:
            lo, hi = int(token_type_ids.min()), int(token_type_ids.max())
            if lo < 0 or hi >= self.config.type_vocab_size:
                raise ValueError(f"{type(self).__name__}: token_type_ids holds {lo if lo < 0 else hi}, outside "
                                 f"[0, type_vocab_size={self.config.type_vocab_size})")
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, N, C)
        x = self.encoder(x, key_padding_mask=padding_mask(attention_mask))
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, C) from [CLS]
        return BaseModelOutput(last_hidden_state=x, pooler_output=pooled)


class BertForMaskedLM(PreTrainedModel):
    """BERT + the MLM head (dense, activation, LayerNorm, decoder tied to the word embeddings).

    labels (B, N): token ids to predict, -100 where no prediction is scored.
    """

    family = "bert"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        config = self.config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation_fn(config.activation)
        self.transform_norm = LayerNorm(config.hidden_size, eps=config.norm_eps, backend=config.backend)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.init_weights(self.transform, self.transform_norm, self.decoder)
        if config.tie_word_embeddings:
            self.decoder.weight = self.bert.embeddings.word.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None):
        h = self.bert(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        logits = self.decoder(self.transform_norm(self.act(self.transform(h))))  # (B, N, vocab)
        loss = None
        if labels is not None:
            check_labels(labels, input_ids.shape, type(self).__name__)
            check_class_labels(labels, self.config.vocab_size, type(self).__name__)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, last_hidden_state=h)


class BertForSequenceClassification(PreTrainedModel):
    """BERT + pooler + dropout + linear classifier. labels (B,) class ids (or floats, see classification_loss)."""

    family = "bert"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        config = self.config
        self.bert = BertModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights(self.classifier)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(self.dropout(out.pooler_output))  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, self.config.num_labels, type(self).__name__)
        return SequenceClassifierOutput(loss=loss, logits=logits, last_hidden_state=out.last_hidden_state)


class BertForTokenClassification(PreTrainedModel):
    """BERT + dropout + a per-token linear classifier. labels (B, N) class ids, -100 ignored."""

    family = "bert"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        config = self.config
        self.bert = BertModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights(self.classifier)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None):
        h = self.bert(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        logits = self.classifier(self.dropout(h))  # (B, N, num_labels)
        loss = None
        if labels is not None:
            who = type(self).__name__
            check_labels(labels, input_ids.shape, who)
            check_class_labels(labels, self.config.num_labels, who)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits, last_hidden_state=h)


class BertForQuestionAnswering(PreTrainedModel):
    """BERT + a linear layer giving span start and end logits per token.

    start_positions, end_positions (B,): token indices of the answer span; indices outside the
    sequence are clamped to seqlen and ignored, as in transformers.
    """

    family = "bert"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        config = self.config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights(self.qa_outputs)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None):
        h = self.bert(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        start_logits, end_logits = self.qa_outputs(h).unbind(-1)  # (B, N) each
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError(f"{type(self).__name__}: give both start_positions and end_positions, or neither")
        if start_positions is not None:
            B, N = input_ids.shape
            for name, pos in (("start_positions", start_positions), ("end_positions", end_positions)):
                if pos.numel() != B:
                    raise ValueError(f"{type(self).__name__}: {name} must have {B} values (one per sequence), "
                                     f"got shape {tuple(pos.shape)}")
            s, e = start_positions.reshape(B).clamp(0, N), end_positions.reshape(B).clamp(0, N)
            loss = (F.cross_entropy(start_logits.float(), s, ignore_index=N)
                    + F.cross_entropy(end_logits.float(), e, ignore_index=N)) / 2
        return QuestionAnsweringOutput(loss=loss, start_logits=start_logits.contiguous(),
                                       end_logits=end_logits.contiguous(), last_hidden_state=h)

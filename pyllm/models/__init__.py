"""BERT-, GPT- and Llama-style Transformers on pyllm's fused attention and LayerNorm/RMSNorm.

Calling conventions follow transformers (`model(input_ids, attention_mask=None, ...)` returning an
output object with .loss / .logits / .last_hidden_state); checkpoints are Hugging Face folders.
"""

from .base import (BaseModelOutput, CausalLMOutput, MaskedLMOutput, ModelOutput, PreTrainedModel,
                   QuestionAnsweringOutput, SequenceClassifierOutput, TokenClassifierOutput)
from .bert import (BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
                   BertForTokenClassification, BertModel)
from .block import Block, KVCache
from .config import TransformerConfig
from .generation import generate
from .gpt import GPTForCausalLM, GPTForSequenceClassification, GPTModel
from .llama import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from pyllm.data.tokenizer import Tokenizer, load_tokenizer  # the one tokenizer, re-exported here
from .bart import BartForConditionalGeneration, BartModel
from .seq2seq import Seq2SeqCache, Seq2SeqConfig, Seq2SeqLMOutput, Seq2SeqModelOutput
from .t5 import T5ForConditionalGeneration, T5Model

__all__ = [
    "TransformerConfig", "Block", "KVCache", "PreTrainedModel",
    "BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
    "BertForQuestionAnswering", "GPTModel", "GPTForCausalLM", "GPTForSequenceClassification",
    "LlamaConfig", "LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification",
    "generate", "Tokenizer", "load_tokenizer",
    "ModelOutput", "BaseModelOutput", "MaskedLMOutput", "CausalLMOutput", "SequenceClassifierOutput",
    "TokenClassifierOutput", "QuestionAnsweringOutput",
    "Seq2SeqConfig", "Seq2SeqCache", "Seq2SeqModelOutput", "Seq2SeqLMOutput",
    "BartModel", "BartForConditionalGeneration", "T5Model", "T5ForConditionalGeneration",
]

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

__all__ = [
    "TransformerConfig", "Block", "KVCache", "PreTrainedModel",
    "BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
    "BertForQuestionAnswering", "GPTModel", "GPTForCausalLM", "GPTForSequenceClassification",
    "LlamaConfig", "LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification",
    "generate", "Tokenizer", "load_tokenizer",
    "ModelOutput", "BaseModelOutput", "MaskedLMOutput", "CausalLMOutput", "SequenceClassifierOutput",
    "TokenClassifierOutput", "QuestionAnsweringOutput",
]

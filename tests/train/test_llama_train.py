"""`pyllm pretrain --arch llama` and Llama fine-tuning heads through the training API and CLI."""

import json

import pytest
import torch

from pyllm.train import ConfigError, finetune, pretrain, predict

from .conftest import QUIET, TINY_MODEL
from .test_cli import FAST, TINY, run
from .test_train import falling, losses


def test_cli_pretrain_arch_llama_then_generate_and_transformers_reads_it(tmp_path, corpus_file, capsys):
    out = tmp_path / "llama"
    argv = ["pretrain", "--arch", "llama", "--num-kv-heads", "1", "--max-steps", "8", "--batch-size", "8",
            "--log-every", "1", "--train-file", str(corpus_file), "--output-dir", str(out), "--sample-tokens", "4",
            *TINY, *FAST]
    assert run(argv) == 0
    assert "sample:" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 2
    assert falling(losses(out))
    assert run(["generate", str(out), "The parser", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The parser")
    transformers = pytest.importorskip("transformers")
    from pyllm.models import LlamaForCausalLM

    ours = LlamaForCausalLM.from_pretrained(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=0)


def test_llama_classification_finetune_and_predict(tmp_path, corpus_file, cls_files):
    base = pretrain(arch="llama", train_file=str(corpus_file), output_dir=str(tmp_path / "llama"), max_steps=2,
                    batch_size=8, sample_prompt=None, **QUIET, **TINY_MODEL)
    train, dev = cls_files
    r = finetune(model=str(base.output_dir), train_file=str(train), validation_file=str(dev),
                 output_dir=str(tmp_path / "cls"), max_steps=6, batch_size=8, max_length=24, learning_rate=3e-3,
                 log_every=1, **QUIET)
    assert 0 <= r.metrics["eval_accuracy"] <= 1 and falling(losses(tmp_path / "cls"), k=2)
    config = json.loads((tmp_path / "cls" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 2
    (p,) = predict(r.output_dir, ["the module opens the file"], device="cpu")
    assert p["label"] in ("neg", "pos")
    with pytest.raises(ValueError, match="dropout 0.1: llama blocks have no hidden dropout"):
        finetune(model=str(base.output_dir), train_file=str(train), output_dir=str(tmp_path / "d"), max_steps=1,
                 dropout=0.1, **QUIET)


def test_arch_options_are_checked():
    with pytest.raises(ConfigError, match="arch 'bert' does not train objective 'clm'.*'gpt' or 'llama'"):
        pretrain(arch="bert", **QUIET)
    with pytest.raises(ConfigError, match="arch 'llama' does not train objective 'mlm'"):
        pretrain(arch="llama", objective="mlm", **QUIET)
    with pytest.raises(ConfigError, match="num_kv_heads is a llama option"):
        pretrain(num_kv_heads=1, **QUIET)
    with pytest.raises(ConfigError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        pretrain(arch="llama", num_kv_heads=3, num_heads=4, **QUIET)
    with pytest.raises(ConfigError, match="arch must be one of"):
        pretrain(arch="gemma", **QUIET)

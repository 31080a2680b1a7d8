"""pyllm.train.memory_plan and `pyllm plan`: the plan against what autograd keeps and what a step measures.

Two checks against measurements: (1) the activations the plan derives from pyllm's forward code equal the
bytes of the distinct storages autograd saves for backward (``saved_tensors_hooks``), for every family,
fp32 and bf16 autocast, with and without checkpointing, LoRA; (2) the step's peak (plan.peak - plan.resident)
is within 15% of the measured high-water mark of the resident memory of one training step on the CPU
(tests/train/memory_probe.py explains what exactly is compared).
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyllm import models as M
from pyllm.train import config as C
from pyllm.train import memory_plan as MP
from pyllm.train import plan

from .conftest import QUIET

B, N = 2, 16
TINY = dict(vocab_size=500, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64)


def saved_bytes(model, batch, precision):
    """Bytes of the distinct storages autograd keeps for backward in one forward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
        return t

    dtype = {"bf16": torch.bfloat16}.get(precision)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            (torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()):
        model(**batch)
    return sum(seen.values())


def _case(name):
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (B, N))
    if name.startswith("gpt"):
        m = M.GPTForCausalLM(M.TransformerConfig(**TINY, hidden_dropout=0.0))
        unfused = {"return_logits": True} if "unfused" in name and MP.fuses_loss(m) else {}
        return m, dict(input_ids=ids, labels=ids, **unfused), {}
    if name == "bert-classifier" or name == "bert-lora":
        m = M.BertForSequenceClassification(M.TransformerConfig(**TINY, num_labels=3))
        if name == "bert-lora":
            pytest.importorskip("peft")
            from pyllm.train import lora

            lora.apply(m, "r=4,alpha=8,dropout=0.05,targets=q,k,v,o")
        return m, dict(input_ids=ids, labels=torch.tensor([0, 2])), {}
    if name == "bert-mlm":
        return M.BertForMaskedLM(M.TransformerConfig(**TINY)), dict(input_ids=ids, labels=ids), {}
    if name.startswith("llama"):
        m = M.LlamaForCausalLM(M.LlamaConfig(**TINY, num_kv_heads=2, intermediate_size=96))
        unfused = {"return_logits": True} if "unfused" in name and MP.fuses_loss(m) else {}
        return m, dict(input_ids=ids, labels=ids, **unfused), {}
    cfg = M.Seq2SeqConfig(model_type=name, vocab_size=500, d_model=64, encoder_layers=2, decoder_layers=2, num_heads=4,
                          ffn_dim=128, max_position_embeddings=64, pad_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2, bos_token_id=None)
    m = (M.BartForConditionalGeneration if name == "bart" else M.T5ForConditionalGeneration)(cfg)
    return m, dict(input_ids=ids, labels=torch.randint(3, 500, (B, 12))), {"target_len": 12}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("name", ["gpt", "gpt-unfused", "bert-classifier", "bert-mlm", "bert-lora", "llama",
                                  "llama-unfused", "bart", "t5"])
def test_activations_equal_what_autograd_keeps(name, ckpt, precision):
    model, batch, extra = _case(name)
    model.train()
    model.gradient_checkpointing = ckpt
    p = plan(model, batch_size=B, seq_len=N, precision=precision, gradient_checkpointing=ckpt,
             fused_loss=False if "unfused" in name else None, **extra)
    planned = sum(nbytes for _, nbytes in p.layers)
    # the only bytes not planned: nll_loss's 4-byte total weight, once per loss
    assert 0 <= saved_bytes(model, batch, precision) - planned <= 8, (p.layers, saved_bytes(model, batch, precision))


def test_step_peak_within_15_percent_of_measured_rss():
    """tests/train/memory_probe.py: every case's measured step peak (VmHWM - baseline RSS) against the plan."""
    probe = Path(__file__).with_name("memory_probe.py")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(MP.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["case"] for r in results} >= {"gpt-fused", "gpt-unfused", "gpt-fused-ckpt", "llama",
                                            "llama-unfused-ckpt", "bert-classifier", "bert-classifier-lora"}
    for r in results:
        assert r["measured"] > 20 * 2**20, r  # tensors, not allocator noise, dominate
        assert 0.85 <= r["estimated"] / r["measured"] <= 1.15, r


def test_the_fused_loss_is_planned_smaller_and_checkpointing_smaller():
    kw = dict(arch="gpt", vocab_size=32000, hidden_size=512, num_layers=4, num_heads=8, batch_size=8, seq_len=512,
              max_position_embeddings=512)
    fused, unfused = plan(**kw), plan(**kw, fused_loss=False)
    assert fused.fused_loss and not unfused.fused_loss
    assert unfused.logits > 4 * fused.logits and unfused.peak > fused.peak
    assert plan(**kw, gradient_checkpointing=True).activations < fused.activations / 2
    bf16 = plan(**kw, precision="bf16")
    assert bf16.activations < fused.activations


def test_lora_plans_the_adapters_only():
    pytest.importorskip("peft")
    from pyllm.train import lora

    model = M.BertForSequenceClassification(M.TransformerConfig(**TINY, num_labels=3))
    spec = "r=4,alpha=8,dropout=0.05,targets=q,k,v,o"
    before = plan(model, batch_size=B, seq_len=N, lora=spec)
    full = plan(model, batch_size=B, seq_len=N)
    lora.apply(model, spec)
    after = plan(model, batch_size=B, seq_len=N)  # the live peft model says the same
    assert before.trainable_parameters == after.trainable_parameters == lora.trainable_parameters(model)[0]
    assert (before.peak, before.parameters, before.optimizer_states) == (after.peak, after.parameters,
                                                                        after.optimizer_states)
    assert before.optimizer_states == 8 * before.trainable_parameters < full.optimizer_states / 20


def test_plan_from_a_folder_and_every_arch(tmp_path):
    model = M.LlamaForCausalLM(M.LlamaConfig(**TINY, num_kv_heads=2, intermediate_size=96))
    model.save_pretrained(tmp_path / "llama")
    from_folder = plan(str(tmp_path / "llama"), batch_size=4, seq_len=32)
    assert from_folder.model == "LlamaForCausalLM" and from_folder.num_parameters == model.num_parameters()
    assert from_folder.peak == plan(model, batch_size=4, seq_len=32).peak
    for arch in MP.ARCHS:
        p = plan(arch=arch, batch_size=2, seq_len=32, hidden_size=64, num_layers=2, num_heads=4, vocab_size=300)
        assert p.peak == sum(p.parts.values()) and p.activations > 0
    assert C.PLAN_ARCHS == MP.ARCHS  # config.py repeats them (it imports only the standard library)


def test_memory_proposes_the_largest_micro_batch_that_fits():
    kw = dict(arch="gpt", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, seq_len=256)
    at = {b: plan(batch_size=64, gradient_accumulation_steps=64 // b, **kw).peak for b in (64, 32, 16, 8)}
    assert at[64] > at[32] > at[16] > at[8]
    memory = (at[16] + at[32]) // 2
    p = plan(batch_size=64, memory=memory, **kw)
    assert p.proposal == {"micro_batch": 16, "gradient_accumulation_steps": 4, "peak": at[16]}
    assert p.peak == at[64] > memory  # the plan itself is of the batch asked for
    assert "micro-batch 16 x accumulation 4" in p.table()
    assert MP.parse_memory("24GB") == 24 * 10**9 and MP.parse_memory("1.5 GiB") == 3 * 2**29
    nbytes, source = MP.device_memory("cpu")
    assert nbytes > 0 and "MemAvailable" in source


def test_even_batch_one_too_large_names_the_part():
    kw = dict(arch="gpt", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, batch_size=8, seq_len=128)
    with pytest.raises(ValueError, match=r"memory must be at least .* for a micro-batch of 1, got 10MB: the "
                                         r"parameters, gradients and optimizer states alone need"):
        plan(memory="10MB", **kw)
    long = {**kw, "seq_len": 512, "max_position_embeddings": 512, "vocab_size": 64}
    one = plan(**{**long, "batch_size": 1})
    with pytest.raises(ValueError, match="activations is the largest part"):  # weights and states fit, not the rest
        plan(memory=one.parameters + one.optimizer_states + 4 * one.trainable_parameters + 1, **long)
    for bad, match in ((dict(memory="lots"), "memory must be a size such as 24GB"),
                       (dict(precision="fp8"), "precision must be one of"),
                       (dict(batch_size=6, gradient_accumulation_steps=4), "must be divisible"),
                       (dict(seq_len=4096), "exceeds the model's max_position_embeddings"),
                       (dict(task="question-answering"), "task must be one of")):
        with pytest.raises(ValueError, match=match):
            plan(**{**kw, **bad})
    with pytest.raises(ValueError, match="fused_loss=True, but BertForMaskedLM computes its loss from full logits"):
        plan(arch="bert", fused_loss=True, vocab_size=300, hidden_size=64, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match=r"lora: unknown target\(s\) \['nope'\]"):
        plan(lora="targets=nope", **kw)


def test_cli_plan(capsys):
    from pyllm.cli import main

    assert main(["plan", "--arch", "llama", "--num-kv-heads", "2", "--seq-len", "64", "--batch-size", "8",
                 "--memory", "2GiB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for word in ("LlamaForCausalLM", "parameters", "gradients", "optimizer states", "activations", "logits/loss",
                 "temporary", "peak", "layers 1-3 (each)", "proposal for an effective batch of 8: micro-batch 8"):
        assert word in out, word
    assert main(["plan", "--json", "--precision", "bf16", "--gradient-checkpointing", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["precision"] == "bf16" and record["gradient_checkpointing"] and record["resident"] > 0
    assert main(["plan", "--memory", "1MB", "--device", "cpu"]) == 2
    assert "memory must be at least" in capsys.readouterr().err
    assert main(["plan", "--batch-size", "6", "--gradient-accumulation-steps", "4"]) == 2
    assert "batch_size (6) must be divisible" in capsys.readouterr().err


def test_finetune_prints_its_plan_first(tmp_path, tiny_bert, cls_files, capsys):
    from pyllm.train import finetune

    train, dev = cls_files
    r = finetune(model=str(tiny_bert), train_file=str(train), validation_file=str(dev), output_dir=str(tmp_path / "c"),
                 max_steps=1, batch_size=8, max_length=24, **QUIET)
    out = capsys.readouterr().out
    assert out.startswith("memory plan: peak ") and "activations" in out.splitlines()[0]
    assert r.metrics["planned_peak_mb"] > 0

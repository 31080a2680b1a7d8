"""Measure the memory of one training step and set it beside pyllm's memory plan.

Run as a program (``python tests/train/memory_probe.py [CASE ...]``, or ``--table`` for README's markdown
table); tests/train/test_memory_plan.py runs it in a subprocess. For each case, in this one process:

1. build the model (seeded) and AdamW (``pyllm.train.optim.build_optimizer``), and run one training step
   (forward under autocast, backward, gradient clipping, ``optimizer.step()``) -- so the optimizer states
   exist, as they do from the second step of a run on;
2. ``zero_grad(set_to_none=True)`` (what the Trainer does at the start of every step), ``gc.collect()``,
   read the resident set size ``VmRSS`` from /proc/self/status: the **baseline** (interpreter, torch,
   parameters, optimizer states, the batch);
3. write "5" to /proc/self/clear_refs (resets the peak, ``VmHWM``, to the current RSS), run one more step
   exactly like the Trainer's, read ``VmHWM``: **measured = VmHWM - baseline**, the memory the step added
   at its peak;
4. ask ``pyllm.train.memory_plan.plan`` for the same model, batch, precision and options: **estimated =
   plan.peak - plan.resident** (the planned peak minus the parameters and optimizer states, which exist
   in the baseline).

glibc's malloc keeps freed blocks below a dynamic threshold (up to 32 MiB) for reuse instead of giving them
back to the system, which would make the RSS a high-water mark of the allocator rather than of the tensors;
the test runs this program with ``MALLOC_MMAP_THRESHOLD_=65536``, so every tensor of 64 KiB or more is its
own mapping, returned when freed -- the CPU analogue of ``torch.cuda.max_memory_allocated`` (on a GPU the
same comparison reads ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` around the step,
with the baseline ``memory_allocated`` before it; not run here: no GPU). One thread, so per-thread
scratch buffers stay small.
"""
from __future__ import annotations

import contextlib
import gc
import json
import sys
from types import SimpleNamespace

import torch

MB = 2**20

# Small but not tiny (tens to a few hundred MB of tensors), so tensors dominate allocator noise; the
# whole set runs in about half a minute on one core.
GPT = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, max_position_embeddings=512,
           hidden_dropout=0.0, activation="gelu_new")
LLAMA = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=688,
             max_position_embeddings=512)
BERT = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, max_position_embeddings=512, num_labels=4)
CASES = {
    "gpt-fused": dict(arch="gpt", config=GPT, batch=4, seq=256),
    "gpt-unfused": dict(arch="gpt", config=GPT, batch=4, seq=256, fused_loss=False),
    "gpt-fused-ckpt": dict(arch="gpt", config=GPT, batch=4, seq=256, ckpt=True),
    "gpt-unfused-bf16": dict(arch="gpt", config=GPT, batch=4, seq=256, fused_loss=False, precision="bf16"),
    "llama": dict(arch="llama", config=LLAMA, batch=4, seq=256),
    "llama-unfused-ckpt": dict(arch="llama", config=LLAMA, batch=4, seq=256, fused_loss=False, ckpt=True),
    "bert-classifier": dict(arch="bert", config=BERT, batch=8, seq=256, task="sequence-classification"),
    "bert-classifier-lora": dict(arch="bert", config=BERT, batch=8, seq=256, task="sequence-classification",
                                 lora="r=8,alpha=16,dropout=0.05,targets=q,k,v,o"),
    "gpt-accumulation": dict(arch="gpt", config=GPT, batch=8, seq=256, accumulation=2),
}


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _model(case: dict):
    import pyllm.models as M

    arch, task = case["arch"], case.get("task")
    if arch == "gpt":
        return M.GPTForCausalLM(M.TransformerConfig(**case["config"]))
    if arch == "llama":
        return M.LlamaForCausalLM(M.LlamaConfig(**case["config"]))
    assert task == "sequence-classification"
    return M.BertForSequenceClassification(M.TransformerConfig(**case["config"]))


def _batches(case: dict, model, g: torch.Generator) -> list[dict]:
    from pyllm.train.memory_plan import fuses_loss

    A = case.get("accumulation", 1)
    micro, N = case["batch"] // A, case["seq"]
    out = []
    for _ in range(A):
        ids = torch.randint(0, model.config.vocab_size, (micro, N), generator=g)
        if case["arch"] == "bert":
            out.append(dict(input_ids=ids, labels=torch.randint(0, model.config.num_labels, (micro,), generator=g)))
        else:
            extra = {"return_logits": True} if case.get("fused_loss") is False and fuses_loss(model) else {}
            out.append(dict(input_ids=ids, labels=ids, **extra))
    return out


def measure(name: str) -> dict:
    """One case: the measured step (see the module docstring) and the plan's estimate, in bytes."""
    from pyllm.train import lora as L
    from pyllm.train.memory_plan import plan
    from pyllm.train.optim import build_optimizer

    case = CASES[name]
    torch.manual_seed(0)
    model = _model(case)
    if case.get("lora"):
        L.apply(model, case["lora"])
    model.gradient_checkpointing = bool(case.get("ckpt"))
    model.train()
    precision = case.get("precision", "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    opt = build_optimizer(model, SimpleNamespace(weight_decay=0.01, learning_rate=1e-4, adam_beta1=0.9,
                                                 adam_beta2=0.999, adam_eps=1e-8))
    batches = _batches(case, model, torch.Generator().manual_seed(1))
    A = len(batches)

    def step():  # pyllm.train.trainer.Trainer._step, without the bookkeeping
        opt.zero_grad(set_to_none=True)
        for batch in batches:
            with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
                loss = model(**batch).loss / A
            loss.backward()
            del loss
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    measured = _status("VmHWM") - baseline
    p = plan(model, batch_size=case["batch"], seq_len=case["seq"], precision=precision,
             gradient_checkpointing=bool(case.get("ckpt")), gradient_accumulation_steps=A,
             fused_loss=case.get("fused_loss"), device="cpu")
    result = {"case": name, "measured": measured, "estimated": p.peak - p.resident, "peak": p.peak,
              "resident": p.resident, "phase": p.phase, "parts": p.parts, "fused_loss": p.fused_loss,
              "parameters_M": round(p.num_parameters / 1e6, 2), "trainable_M": round(p.trainable_parameters / 1e6, 3)}
    del model, opt, batches
    gc.collect()
    return result


def table(results: list[dict]) -> str:
    """README's markdown table of the cases."""
    rows = ["| case | model | measured step peak (MiB) | plan (MiB) | plan / measured | peak phase (plan) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        c = CASES[r["case"]]
        opts = [c.get("precision", "fp32"), f"B{c['batch']} N{c['seq']}"]
        if c.get("ckpt"):
            opts.append("checkpointing")
        if c.get("accumulation"):
            opts.append(f"accumulation {c['accumulation']}")
        if c.get("lora"):
            opts.append("LoRA r=8 q,k,v,o")
        if c["arch"] in ("gpt", "llama"):
            opts.append("fused loss" if r["fused_loss"] else "unfused loss")
        model = f"{c['arch']} {r['parameters_M']}M ({', '.join(opts)})"
        rows.append(f"| {r['case']} | {model} | {r['measured'] / MB:.1f} | {r['estimated'] / MB:.1f} | "
                    f"{r['estimated'] / r['measured']:.3f} | {r['phase']} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    names = [a for a in argv if not a.startswith("--")] or list(CASES)
    results = [measure(n) for n in names]
    print(table(results) if "--table" in argv else json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

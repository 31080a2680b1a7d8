"""Generation: tokens/s of greedy decoding, pyllm's decoders against transformers' generate on the same weights.

    python benchmarks/bench_generate.py [--device cpu|cuda] [--quick] [--compile] [--module-path] [--tiny]
                                        [--json out.json]

Two models with random weights, built in pyllm, saved as Hugging Face folders and loaded back into
transformers (so both run the same weights): a GPT-2-124M-shaped GPTForCausalLM (12 layers, hidden 768,
12 heads, vocabulary 50257) and a Llama of similar size (12 layers, hidden 768, 12 query / 4 kv heads,
SwiGLU 2048, vocabulary 32000). For batch 1 and 8: a 512-token prompt, then 128 new tokens, greedy, no
early stop. Before timing, both must produce the same tokens (a wrong provider is reported, not timed).
Reported: tokens/s (batch * new tokens / time of the whole generate call, prefill included), the ratio
pyllm / transformers (> 1 = pyllm faster) and the time of one decode step (generate's time minus a
prefill-only call, divided by the new tokens - 1). A decode step must read every weight matrix once (the
Linear layers and the LM head) and the KV cache so far, whoever runs it: each row also reports those bytes,
the bandwidth each decode step achieves over them (GB/s), and the machine's memory peak measured in the
same run (``Limits.memory_peak``: the best of a read, a copy and an add, every byte counted). A step near
that ceiling is bound by memory; the ratio then cannot exceed what the other side leaves of the ceiling.

--compile adds pyllm's generate(compile=True) (the decode step as one torch.compile graph over the static
cache; compilation happens in the token check, before timing). --module-path adds pyllm's eager generate on
the module path (``pyllm-module``): a no-op forward hook on the backbone makes ``block.direct_decode_ok`` false,
so the steps go through ``nn.Module.__call__`` as before the blocks' ``decode`` methods existed (the hook itself
runs once, on the prompt). --tiny shrinks the widths (hidden 64, 4 / 2 heads, MLP 128, vocabulary 128; the
preset's layers, prompt and new tokens): the weights cost nothing, so a decode step is its overhead alone.
--quick: 2 layers, prompt 64, 16 new tokens, batch 1 and 4 (a smoke run of a minute or two on a CPU; add
--max-s 5 on a loaded machine).
Timings on a shared machine are noisy: compare the ratio, measured alternately in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FULL = dict(layers=12, prompt=512, new=128, batches=(1, 8))
QUICK = dict(layers=2, prompt=64, new=16, batches=(1, 4))


def build(arch: str, layers: int, tiny: bool = False):
    """(pyllm model, transformers model) with the same weights, eval mode, no EOS. tiny: widths whose weights
    cost nothing (the decode step's overhead alone)."""
    import transformers

    from pyllm.models import GPTForCausalLM, LlamaConfig, LlamaForCausalLM, TransformerConfig

    torch.manual_seed(0)
    vocab, hidden, heads, kv_heads, mlp = (128, 64, 4, 2, 128) if tiny else (None, 768, 12, 4, 2048)
    if arch == "gpt2":
        cfg = TransformerConfig(vocab_size=vocab or 50257, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                max_position_embeddings=1024, hidden_dropout=0.0, norm_eps=1e-5)
        ours = GPTForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=vocab or 32000, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          num_kv_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=1024)
        ours = LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder, overwrite=True)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return ours.eval(), theirs.eval()


def bytes_per_step(model, batch: int, prompt: int, new: int) -> tuple[int, int]:
    """(weight bytes, mean KV-cache bytes) a decode step reads: every Linear weight and bias (the LM head
    included, a tied one once) and, per layer, K and V of the positions cached so far (mean over the steps)."""
    seen, weights = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            for p in (m.weight, m.bias):
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    weights += p.numel() * p.element_size()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_heads)
    per_position = 2 * cfg.num_layers * batch * cfg.num_kv_heads * head_dim * next(model.parameters()).element_size()
    return weights, int(per_position * (prompt + new / 2))


def run(args) -> dict:
    from pyllm.bench.measure import COPY_STREAM_NUMEL, Limits, machine_info, summarize, time_interleaved

    p = QUICK if args.quick else FULL
    device, threads = args.device, torch.get_num_threads()
    results = {"machine": machine_info(device, threads), "preset": "quick" if args.quick else "full", "rows": []}
    limits = Limits(device, threads)
    mem_gbps = limits.memory_peak(torch.float32, 4 * COPY_STREAM_NUMEL[device])  # beyond the caches
    results["memory_peak_gbps"] = mem_gbps
    print(f"memory peak {mem_gbps:.1f} GB/s (best of read / copy / add, {threads} threads)", flush=True)
    extra = (("pyllm-compile",) if args.compile else ()) + (("pyllm-module",) if args.module_path else ())
    for arch in args.arch or ("gpt2", "llama"):
        ours, theirs = (m.to(device) for m in build(arch, p["layers"], tiny=args.tiny))
        backbone = ours.transformer if arch == "gpt2" else ours.model
        for B in args.batch or p["batches"]:
            ids = torch.randint(0, min(32000, ours.config.vocab_size), (B, p["prompt"]),
                                generator=torch.Generator().manual_seed(B)).to(device)
            new = p["new"]

            def gen_ours(n=new):
                return ours.generate(ids, max_new_tokens=n, eos_token_id=None)

            def gen_theirs(n=new):
                return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)

            def gen_compiled(n=new):
                return ours.generate(ids, max_new_tokens=n, eos_token_id=None, compile=True)

            def gen_module_path(n=new):  # a hook anywhere keeps generate() on nn.Module.__call__
                handle = backbone.register_forward_hook(lambda *a: None)
                try:
                    return ours.generate(ids, max_new_tokens=n, eos_token_id=None)
                finally:
                    handle.remove()

            with torch.no_grad():
                want = gen_theirs()
                same = (torch.equal(gen_ours(), want) and (not args.compile or torch.equal(gen_compiled(), want))
                        and (not args.module_path or torch.equal(gen_module_path(), want)))
            row = {"arch": arch, "batch": B, "prompt": p["prompt"], "new": new, "same_tokens": same}
            if not same:
                print(f"{arch} B{B}: WRONG -- pyllm and transformers generate different tokens; not timed")
                results["rows"].append(row)
                continue
            fns = {"pyllm": gen_ours, "transformers": gen_theirs,
                   "pyllm-prefill": lambda: gen_ours(1), "transformers-prefill": lambda: gen_theirs(1)}
            if args.compile:  # the prefill is the same eager forward: pyllm-prefill serves all of pyllm's
                fns["pyllm-compile"] = gen_compiled
            if args.module_path:
                fns["pyllm-module"] = gen_module_path
            with torch.no_grad():
                times = time_interleaved(fns, device, threads=threads, repeats=args.repeats, warmup=1,
                                         min_run_s=0.0, max_s=args.max_s)
            med = {n: summarize(t)["median_ms"] / 1e3 for n, t in times.items()}  # seconds
            for who in ("pyllm", "transformers") + extra:
                prefill = med[f"{who.split('-')[0]}-prefill"]
                row[f"{who}_tokens_per_s"] = B * new / med[who]
                row[f"{who}_decode_step_ms"] = 1e3 * (med[who] - prefill) / max(new - 1, 1)
            row["ratio"] = row["pyllm_tokens_per_s"] / row["transformers_tokens_per_s"]
            weights, kv = bytes_per_step(ours, B, p["prompt"], new)
            row["weight_mb_per_step"], row["kv_mb_per_step"] = weights / 1e6, kv / 1e6
            for who in ("pyllm", "transformers") + extra:
                row[f"{who}_decode_gbps"] = (weights + kv) / (row[f"{who}_decode_step_ms"] / 1e3) / 1e9
            if args.compile:
                row["compile_ratio"] = row["pyllm-compile_tokens_per_s"] / row["transformers_tokens_per_s"]
            results["rows"].append(row)
            print(f"{arch:5s} B{B} prompt {p['prompt']} +{new}: pyllm {row['pyllm_tokens_per_s']:8.1f} tok/s "
                  f"(decode step {row['pyllm_decode_step_ms']:.1f} ms), transformers "
                  f"{row['transformers_tokens_per_s']:8.1f} tok/s (decode step {row['transformers_decode_step_ms']:.1f}"
                  f" ms): {row['ratio']:.2f}x" + (f"; compiled {row['pyllm-compile_tokens_per_s']:8.1f} tok/s (decode "
                                                  f"step {row['pyllm-compile_decode_step_ms']:.1f} ms): "
                                                  f"{row['compile_ratio']:.2f}x" if args.compile else ""), flush=True)
            if args.module_path:
                row["module_ratio"] = row["pyllm-module_tokens_per_s"] / row["transformers_tokens_per_s"]
                print(f"      module path (no direct decode): {row['pyllm-module_tokens_per_s']:8.1f} tok/s (decode step "
                      f"{row['pyllm-module_decode_step_ms']:.2f} ms; direct {row['pyllm_decode_step_ms']:.2f} ms): "
                      f"{row['module_ratio']:.2f}x", flush=True)
            print(f"      a decode step reads {row['weight_mb_per_step']:.0f} MB of weights + {row['kv_mb_per_step']:.0f} "
                  f"MB of KV cache: pyllm {row['pyllm_decode_gbps']:.1f} GB/s, transformers "
                  f"{row['transformers_decode_gbps']:.1f} GB/s (memory peak {mem_gbps:.1f} GB/s)", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="2 layers, prompt 64, 16 new tokens, batch 1 and 4")
    ap.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-s", type=float, default=60.0, help="time budget per provider and case (seconds)")
    ap.add_argument("--module-path", action="store_true",
                    help="also time pyllm's eager generate on the module path (no direct decode)")
    ap.add_argument("--tiny", action="store_true", help="tiny widths, 12 layers: the decode step's overhead alone")
    ap.add_argument("--arch", nargs="+", choices=("gpt2", "llama"), help="only these models (default: both)")
    ap.add_argument("--batch", nargs="+", type=int, help="only these batch sizes (default: 1 and 8; quick: 1 and 4)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    bad = [r for r in results["rows"] if not r["same_tokens"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

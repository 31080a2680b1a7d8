"""Training: pyllm's GPT against transformers' GPT-2, and the longest sequence that trains in a memory budget.

    python benchmarks/bench_train.py [--device cpu|cuda] [--quick] [--json out.json]

(a) Throughput: tokens/s of one full training step (forward, backward, AdamW step) of
    pyllm.models.GPTForCausalLM and transformers.GPT2LMHeadModel built from the same
    configuration (4 layers, hidden 256, 4 heads, vocabulary 8192, batch 8 x 256 tokens,
    dropout 0), the same weights and the same optimizer: torch's fused AdamW (one kernel over all
    parameters, on the CPU too), which pyllm's Trainer and transformers' Trainer both use by default
    (``--optimizer foreach`` takes torch's multi-tensor AdamW instead, slower for both). The two are timed
    alternately, round by round, with pyllm.bench.measure's timer (the one ``pyllm bench``
    uses), and the median is reported with the ratio pyllm / transformers (> 1 = pyllm faster).
(b) Memory: the longest sequence (batch 1, doubling 512, 1024, ...) whose forward and
    backward pass through a small GPT (2 layers, hidden 128, 2 heads) fit a memory budget,
    with pyllm's fused attention ("auto" backend) and with the reference attention
    (pyllm.backends.use("reference"), which forms the N x N scores). On CPU each point runs
    in a fresh subprocess; the peak is pyllm.bench.measure's (CPU: resident-set high-water
    mark over the resident set before the pass; CUDA: torch.cuda.max_memory_allocated).

Page faults: (a) also counts the minor page faults of one step of each model (CPU). glibc's malloc hands
large freed blocks back to the OS (mmap above a threshold, heap trimming), so a step whose tensors were
freed by the last one pays for fresh zeroed pages again: transformers' (tokens, vocabulary) logits,
log-softmax and their gradients (64 MB each here) fault on every step, pyllm's fused linear
cross-entropy never forms them. To measure both with freed memory kept for reuse, set glibc's tunables
for the run, e.g. ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 python
benchmarks/bench_train.py`` (jemalloc or tcmalloc through LD_PRELOAD do the same); the header prints them.

--quick shrinks everything to a smoke run (seconds). Timings on a shared machine are noisy:
compare the ratio, which is measured side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GPT = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, batch=8, seq=256)
QUICK_GPT = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, batch=2, seq=128)
SMALL = dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=2)


# -- (a) throughput -------------------------------------------------------------------------


def build_pair(cfg: dict, device):
    """pyllm GPTForCausalLM and transformers GPT2LMHeadModel with identical config and weights."""
    import tempfile

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import pyllm.models as M

    torch.manual_seed(0)
    mine = M.GPTForCausalLM(M.TransformerConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"], max_position_embeddings=max(cfg["seq"], 256), type_vocab_size=0,
        activation="gelu_new", hidden_dropout=0.0, norm_eps=1e-5))
    with tempfile.TemporaryDirectory() as d:  # same weights: through the HF checkpoint format
        mine.save_pretrained(d, overwrite=True)
        theirs = GPT2LMHeadModel.from_pretrained(d, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_cfg = theirs.config
    assert isinstance(hf_cfg, GPT2Config) and hf_cfg.n_layer == cfg["num_layers"]
    return mine.to(device).train(), theirs.to(device).train()


def train_step(model, ids, opt):
    """One training step (forward, backward, AdamW) as a zero-argument callable."""

    def step():
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def throughput(device: str, quick: bool, threads: int, optimizer: str = "fused") -> dict:
    import torch

    from pyllm.bench.measure import summarize, time_interleaved

    cfg = QUICK_GPT if quick else GPT
    mine, theirs = build_pair(cfg, device)
    ids = torch.randint(cfg["vocab_size"], (cfg["batch"], cfg["seq"]), device=device)
    with torch.no_grad():  # same weights -> same loss: a check that we compare like with like
        a, b = float(mine(ids, labels=ids).loss), float(theirs(ids, labels=ids).loss)
    if abs(a - b) > 1e-3 * max(1.0, abs(b)):
        raise SystemExit(f"bench_train: pyllm loss {a:.5f} != transformers loss {b:.5f} on the same weights")
    kind = {"fused": True} if optimizer == "fused" else {"foreach": True}
    steps = {n: train_step(m, ids, torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01, **kind))
             for n, m in (("pyllm", mine), ("transformers", theirs))}
    rounds = 3 if quick else 7
    secs = time_interleaved(steps, device, threads=threads, repeats=rounds, warmup=2, min_run_s=0.0,
                            max_s=10.0 if quick else 60.0)
    tokens = cfg["batch"] * cfg["seq"]
    tps = {name: tokens / (summarize(s)["median_ms"] / 1e3) for name, s in secs.items()}
    return {"config": cfg, "rounds": {n: len(s) for n, s in secs.items()}, "tokens_per_s": tps,
            "ratio": tps["pyllm"] / tps["transformers"], "loss_check": [a, b], "optimizer": optimizer,
            "page_faults_per_step": {n: faults_per_step(f) for n, f in steps.items()} if device == "cpu" else None}


def faults_per_step(step, n: int = 3) -> float:
    """Minor page faults (fresh pages the kernel had to map and zero) per call of ``step``, over ``n`` calls."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n


def allocator() -> str:
    """The C allocator's settings that decide whether freed memory is reused (see the module docstring)."""
    import platform

    tunables = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    libc = " ".join(platform.libc_ver()).strip() or "unknown libc"
    return f"{libc}, " + (", ".join(f"{k}={v}" for k, v in sorted(tunables.items())) if tunables else "default "
                          "settings (large freed blocks go back to the OS)")


# -- (b) longest trainable sequence ----------------------------------------------------------------


def child(impl: str, seq: int, device: str) -> dict:
    """One forward+backward at (1, seq) in this process; its peak memory beyond what was allocated before
    (pyllm.bench.measure: after one warm-up pass, so one-time costs and grad buffers are not counted)."""
    import torch

    import pyllm
    import pyllm.models as M
    from pyllm.bench.measure import peak_memory_cuda, rss_peak_of

    torch.manual_seed(0)
    model = M.GPTForCausalLM(M.TransformerConfig(
        **SMALL, max_position_embeddings=seq, type_vocab_size=0, hidden_dropout=0.0)).to(device)
    ids = torch.randint(SMALL["vocab_size"], (1, seq), device=device)
    backend = "reference" if impl == "reference" else "auto"

    def fwd_bwd():
        with pyllm.backends.use(backend):
            model(ids, labels=ids).loss.backward()

    t = time.perf_counter()
    peak = peak_memory_cuda(fwd_bwd) if device == "cuda" else rss_peak_of(fwd_bwd)
    return {"impl": impl, "seq": seq, "mb": peak / 2**20, "seconds": (time.perf_counter() - t) / 2}


def run_point(impl: str, seq: int, device: str, timeout: float) -> dict:
    if device == "cuda":  # CUDA stats are per process already: run in place
        import torch

        try:
            return child(impl, seq, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"impl": impl, "seq": seq, "mb": float("inf"), "error": "out of memory"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(seq), "--device", device]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # as pyllm bench's memory worker: freed
    try:                                                                # blocks go back to the OS
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "seq": seq, "mb": float("inf"), "error": f"took over {timeout:.0f} s"}
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"impl": impl, "seq": seq, "mb": float("inf"), "error": last[-200:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def longest(device: str, quick: bool, budget_mb: float, max_seq: int, timeout: float) -> dict:
    out = {}
    for impl in ("pyllm", "reference"):
        points, best, seq = [], None, 256 if quick else 512
        while seq <= max_seq:
            r = run_point(impl, seq, device, timeout)
            points.append(r)
            fits = r["mb"] <= budget_mb
            print(f"  {impl:<9} seq {seq:>6}: {r['mb']:>9.1f} MB {'fits' if fits else 'over budget'}"
                  f"{'  (' + r['error'] + ')' if 'error' in r else ''}", flush=True)
            if not fits:
                break
            best = seq
            seq *= 2
        out[impl] = {"longest": best, "points": points}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's count)")
    ap.add_argument("--budget-mb", type=float, default=None,
                    help="memory budget for (b) (default: 2048 MB on CPU, 8192 MB on CUDA; 64 with --quick)")
    ap.add_argument("--max-seq", type=int, default=None, help="stop (b) at this length (default 65536; "
                                                              "2048 with --quick)")
    ap.add_argument("--optimizer", choices=("fused", "foreach"), default="fused",
                    help="AdamW implementation for both models in (a) (default: fused)")
    ap.add_argument("--no-memory", action="store_true", help="skip (b)")
    ap.add_argument("--no-throughput", action="store_true", help="skip (a)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), device)))
        return 0
    import pyllm

    q = torch.zeros(1, 64, 2, 64, device=device)
    served = [b for b, why in pyllm.backends.explain("attention", q, q, q, causal=True).items() if not why]
    report = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "attention_backends": served}
    print(f"pyllm attention backends able to serve this device: {', '.join(served)} "
          f"(\"auto\" picks the fastest; only \"reference\" means no fused kernel is built)")
    if not args.no_throughput:
        print(f"(a) training throughput on {device} ({torch.get_num_threads()} threads): "
              f"GPT {'quick' if args.quick else 'full'} config", flush=True)
        if device == "cpu":
            report["allocator"] = allocator()
            print(f"  allocator: {report['allocator']}")
        r = throughput(device, args.quick, torch.get_num_threads(), args.optimizer)
        c = r["config"]
        print(f"  {c['num_layers']} layers, hidden {c['hidden_size']}, {c['num_heads']} heads, vocab "
              f"{c['vocab_size']}, batch {c['batch']} x {c['seq']}; median of alternating rounds {r['rounds']}")
        faults = r["page_faults_per_step"] or {}
        for name, v in r["tokens_per_s"].items():
            extra = f"   {faults[name]:>9.0f} page faults / step" if name in faults else ""
            print(f"  {name:<13} {v:>10.0f} tokens/s{extra}")
        print(f"  ratio pyllm / transformers: {r['ratio']:.2f}x")
        report["throughput"] = r
    if not args.no_memory:
        budget = args.budget_mb or (64 if args.quick else (8192 if device == "cuda" else 2048))
        max_seq = args.max_seq or (2048 if args.quick else 65536)
        print(f"(b) longest sequence whose forward+backward fits {budget:.0f} MB "
              f"(GPT 2 layers, hidden 128, batch 1) on {device}", flush=True)
        r = longest(device, args.quick, budget, max_seq, timeout=120 if args.quick else 900)
        for impl, v in r.items():
            print(f"  {impl:<9} longest: {v['longest']}")
        report["memory"] = {"budget_mb": budget, **r}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

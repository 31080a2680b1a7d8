"""Encoder-decoders: pyllm's BART against transformers' BartForConditionalGeneration.

    python benchmarks/bench_seq2seq.py [--device cpu|cuda] [--quick] [--optimizer fused|foreach] [--json out.json]

(a) Training throughput: target tokens/s of one full step (forward, backward, AdamW) of
    pyllm.models.BartForConditionalGeneration and transformers' BartForConditionalGeneration built from the
    same configuration (d_model 256, 3+3 layers, 4 heads, FFN 1024, vocabulary 8192, dropout 0, batch 8,
    source 128 and target 128 tokens, right-padded sources) and the same weights (through the Hugging Face
    folder format), timed alternately; also the loss of both over the same 20 steps on the same batches (the
    curves must agree). Both take the same torch.optim.AdamW (lr 3e-4, weight decay 0.01), by default
    fused=True (torch's single-kernel AdamW, on the CPU too; what a user timing a training step would pick);
    --optimizer foreach takes torch's default multi-tensor AdamW instead (slower for both; measured quiet on
    2 cores, one step of it costs pyllm's 103 parameter tensors 18 ms and transformers' 133 tensors 31 ms,
    fused 4.4 and 5.9 ms; the training ratio came out 1.21x-1.39x run to run either way).
(b) Beam search: generated tokens/s of generate(num_beams=4, max_new_tokens=32) on a padded batch of 8
    sources, both models, same weights (EOS kept unlikely, so every source decodes all 32 tokens); the
    outputs are compared token for token before timing.

(c) --generate-base, instead of (a) and (b): generation at BART-base widths (d_model 768, 6+6 layers, 12 heads,
    FFN 3072, vocabulary 50265, ~140M parameters, fp32), one 64-token source and a batch of 4, greedy and 4 beams,
    32 new tokens: the sizes where a decode step reads every weight for 1-16 rows (pyllm.nn.Linear's decode GEMV,
    pyllm/nn/linear.py) and its time is the time to stream the weights. Same weights and token check as (b).

--quick shrinks both to a smoke run (seconds). Timings on a shared machine are noisy: compare the ratio
(pyllm / transformers, > 1 = pyllm faster), which is measured side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

FULL = dict(vocab=8192, d_model=256, layers=3, heads=4, ffn=1024, batch=8, src=128, tgt=128, beams=4, new=32,
            curve_steps=20, steps=3, rounds=5)
BASE_GEN = dict(vocab=50265, d_model=768, layers=6, heads=12, ffn=3072, src=64, tgt=64, new=32, rounds=3)
QUICK = dict(vocab=1024, d_model=64, layers=2, heads=4, ffn=128, batch=4, src=32, tgt=32, beams=3, new=8,
             curve_steps=3, steps=1, rounds=3)


def build_pair(c: dict, device):
    import torch
    import transformers

    from pyllm.models import BartForConditionalGeneration, Seq2SeqConfig

    torch.manual_seed(0)
    mine = BartForConditionalGeneration(Seq2SeqConfig(
        model_type="bart", vocab_size=c["vocab"], d_model=c["d_model"], encoder_layers=c["layers"],
        decoder_layers=c["layers"], num_heads=c["heads"], ffn_dim=c["ffn"],
        max_position_embeddings=max(c["src"], c["tgt"], c["new"] + 1), dropout=0.0))
    with tempfile.TemporaryDirectory() as d:
        mine.save_pretrained(d, overwrite=True)
        theirs = transformers.BartForConditionalGeneration.from_pretrained(d)
    return mine.to(device), theirs.to(device)


def batch(c: dict, device, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, c["vocab"], (c["batch"], c["src"]), generator=g)
    mask = torch.ones_like(ids)
    for i in range(c["batch"]):
        mask[i, c["src"] - i * c["src"] // (2 * c["batch"]):] = 0  # rows of decreasing length
    labels = torch.randint(3, c["vocab"], (c["batch"], c["tgt"]), generator=g)
    return ids.masked_fill(mask == 0, 1).to(device), mask.to(device), labels.to(device)


def step(model, opt, b):
    ids, mask, labels = b
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def training(c: dict, device: str, optimizer: str = "fused") -> dict:
    import torch
    mine, theirs = build_pair(c, device)
    models = {"pyllm": mine.train(), "transformers": theirs.train()}
    kind = {"fused": True} if optimizer == "fused" else {"foreach": True}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.01, **kind) for n, m in models.items()}
    curves = {n: [step(m, opts[n], batch(c, device, s)) for s in range(c["curve_steps"])] for n, m in models.items()}
    gap = max(abs(a - b) for a, b in zip(curves["pyllm"], curves["transformers"]))
    b = batch(c, device, 0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    secs = {n: [] for n in models}
    for r in range(c["rounds"]):  # alternate who goes first so drifting load hits both
        for n in (list(models) if r % 2 == 0 else list(reversed(models))):
            sync()
            t = time.perf_counter()
            for _ in range(c["steps"]):
                step(models[n], opts[n], b)
            sync()
            secs[n].append(time.perf_counter() - t)
    tokens = c["batch"] * c["tgt"] * c["steps"]
    tps = {n: tokens / statistics.median(s) for n, s in secs.items()}
    return {"target_tokens_per_s": tps, "ratio": tps["pyllm"] / tps["transformers"], "optimizer": optimizer,
            "loss_curves": curves, "max_loss_gap": gap}


def beam(c: dict, device: str) -> dict:
    import torch
    mine, theirs = (m.eval() for m in build_pair(c, device))
    with torch.no_grad():  # an untrained model ranks a 1-token hypothesis (EOS) best: keep EOS out, so every
        for m in (mine, theirs):  # source decodes max_new_tokens and the timing covers them all
            m.final_logits_bias[0, 2] = -30.0
    ids, mask, _ = batch(c, device, 1)
    kw = dict(num_beams=c["beams"], max_new_tokens=c["new"])
    with torch.no_grad():
        a = mine.generate(ids, mask, **kw)
        b = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    same = a.shape == b.shape and bool((a == b).all())
    secs = {"pyllm": [], "transformers": []}
    for r in range(c["rounds"]):
        for n in (["pyllm", "transformers"] if r % 2 == 0 else ["transformers", "pyllm"]):
            t = time.perf_counter()
            with torch.no_grad():
                out = (mine.generate(ids, mask, **kw) if n == "pyllm" else
                       theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw))
            secs[n].append((time.perf_counter() - t, (out.shape[1] - 1) * out.shape[0]))
    tps = {n: statistics.median(tok / s for s, tok in v) for n, v in secs.items()}
    return {"generated_tokens_per_s": tps, "ratio": tps["pyllm"] / tps["transformers"], "same_tokens": same}


def generate_base(args) -> int:
    """(c): BART-base widths, batch 1 and 4, greedy and 4 beams (the module docstring)."""
    rows = []
    base = dict(BASE_GEN, new=8, rounds=1, vocab=2048) if args.quick else BASE_GEN
    for batch_size in (1, 4):
        for beams in (1, 4):
            c = dict(base, batch=batch_size, beams=beams)
            r = beam(c, args.device)
            rows.append({"batch": batch_size, "beams": beams, **r})
            print(f"BART-base widths, batch {batch_size}, {beams} beam(s): pyllm "
                  f"{r['generated_tokens_per_s']['pyllm']:.1f} tok/s, transformers "
                  f"{r['generated_tokens_per_s']['transformers']:.1f}: {r['ratio']:.2f}x; same tokens: {r['same_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": base, "generate_base": rows}, f, indent=2)
    return 0 if all(r["same_tokens"] for r in rows) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--optimizer", choices=("fused", "foreach"), default="fused",
                   help="torch.optim.AdamW implementation, the same for both models (default: fused)")
    p.add_argument("--generate-base", action="store_true",
                   help="only (c): greedy and 4-beam generation at BART-base widths, batch 1 and 4")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import transformers
    transformers.logging.set_verbosity_error()
    if args.generate_base:
        return generate_base(args)
    c = QUICK if args.quick else FULL
    out = {"config": c, "training": training(c, args.device, args.optimizer), "beam_search": beam(c, args.device)}
    t, b = out["training"], out["beam_search"]
    print(f"training  pyllm {t['target_tokens_per_s']['pyllm']:.0f} target tok/s, transformers "
          f"{t['target_tokens_per_s']['transformers']:.0f}: {t['ratio']:.2f}x (AdamW {args.optimizer}); loss curves over "
          f"{c['curve_steps']} steps differ by at most {t['max_loss_gap']:.2e}")
    print(f"beam x{c['beams']} pyllm {b['generated_tokens_per_s']['pyllm']:.0f} tok/s, transformers "
          f"{b['generated_tokens_per_s']['transformers']:.0f}: {b['ratio']:.2f}x; same tokens: {b['same_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if b["same_tokens"] and t["max_loss_gap"] < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())

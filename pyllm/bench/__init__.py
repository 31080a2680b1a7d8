"""pyllm.bench: measure pyllm's ops against PyTorch and peer libraries, checked before timed.

    from pyllm import bench
    report = bench.bench(["attention"], preset="quick")        # or bench.run(cases, ...)
    print(bench.table(report)); bench.write_json(report, "bench.json"); bench.plot(report, "plots/")

The command line is ``pyllm bench`` (see :mod:`pyllm.bench.cli` and docs/bench.md). Submodules:
``spec`` (cases, presets, FLOP/byte counts), ``providers``, ``work`` (inputs and timed callables),
``check`` (correctness), ``measure`` (timing, memory, device limits), ``runner``, ``report``.
Attributes load on first use (:mod:`pyllm._lazy`), so importing the CLI does not import torch.
"""
from __future__ import annotations

from pyllm._lazy import lazy_exports

_LAZY = {
    "Case": "spec", "BenchError": "spec", "build_cases": "spec", "parse_shape": "spec", "flops": "spec",
    "bytes_moved": "spec", "OPS": "spec", "MODES": "spec", "PRESETS": "spec",
    "Provider": "providers", "all_providers": "providers", "BASELINES": "providers",
    "run": "runner", "bench": "runner", "SCHEMA": "runner",
    "table": "report", "write_json": "report", "load_json": "report", "plot": "report",
    "report_ratios": "report", "markdown": "report", "run_script": "report",
}

__all__ = sorted(_LAZY)


lazy_exports(__name__, {name: f"{__name__}.{module}:{name}" for name, module in _LAZY.items()})

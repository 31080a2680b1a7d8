"""CPU peak-memory worker: ``python -m pyllm.bench._memworker`` reads {"threads", "items"} JSON on stdin and
prints one JSON list of {"peak_bytes", "error"} (see :func:`pyllm.bench.measure.peak_memory_cpu`).

It runs in its own process so the benchmark's allocations and caches do not blur the resident-set figures.
"""
from __future__ import annotations

import json
import sys


def main() -> int:
    req = json.loads(sys.stdin.read())
    import torch

    from .measure import rss_peak_of
    from .providers import all_providers
    from .spec import Case
    from .work import build_timed

    torch.set_num_threads(int(req["threads"]))
    providers = {p.name: p for p in all_providers()}
    out = []
    for item in req["items"]:
        try:
            case = Case.from_dict(item["case"])
            fn = build_timed(case, providers[item["provider"]], "cpu", item.get("seed", 0))
            out.append({"peak_bytes": rss_peak_of(fn), "error": None})
            del fn
        except Exception as e:  # noqa: BLE001
            out.append({"peak_bytes": None, "error": f"{type(e).__name__}: {e}"})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

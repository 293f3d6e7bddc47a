"""Poll-and-diff backends: change detection latency and watching cost of the soma-workflow and
ctrl_bps WMS (Parsl) sessions at their default intervals, against each package's own wait call
in the same run (soma's ``wait_job``, Parsl's blocking ``submit()`` / job futures).

    .venv/bin/python bench/poll_backends.py [--quick] [--only soma|wms] [--json PATH]

Everything is real (soma-workflow light-mode controllers, Parsl with the session's thread site);
each half lives in its own module (``bench/_poll_soma.py``, ``bench/_poll_wms.py``), whose
docstring says exactly what is timed. The ratios compare flowbus's detection with the
package's own wait on the same jobs, so the machine's speed cancels out:

* ``soma_ratio`` = session p50 / ``wait_job`` p50 (below 1: flowbus sees a change sooner than
  soma's own wait, which polls its database once a second);
* ``wms_ratio`` = session p50 / Parsl future-callback p50 (the floor: Parsl itself learning
  that the job ended).

The last line is

    BENCH poll_backends soma_p50_ms= soma_p99_ms= soma_ratio= soma_cpu_pct_per_wf= wms_p50_ms= wms_p99_ms= wms_ratio= wms_cpu_pct_per_wf=
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import _poll_soma
import _poll_wms


def _f(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "na"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer jobs and workflows (a smoke run)")
    ap.add_argument("--only", choices=["soma", "wms"], help="run one half")
    ap.add_argument("--json", help="also write every number to this file")
    args = ap.parse_args()
    out: dict[str, float] = {}
    if args.only in (None, "soma"):
        print("soma-workflow ...", flush=True)
        out.update(_poll_soma.measure(quick=args.quick))
        print("  " + " ".join(f"{k}={_f(v)}" for k, v in out.items() if k.startswith("soma_")), flush=True)
    if args.only in (None, "wms"):
        print("ctrl_bps WMS (Parsl) ...", flush=True)
        out.update(_poll_wms.measure(quick=args.quick))
        print("  " + " ".join(f"{k}={_f(v)}" for k, v in out.items() if k.startswith("wms_")), flush=True)

    def ratio(a: str, b: str) -> float | None:
        return out[a] / out[b] if a in out and b in out and out[b] > 0 else None

    def pct(key: str) -> float | None:
        return 100.0 * out[key] if key in out else None

    summary = {
        "soma_p50_ms": out.get("soma_p50_ms"), "soma_p99_ms": out.get("soma_p99_ms"),
        "soma_ratio": ratio("soma_p50_ms", "soma_wait_p50_ms"),
        "soma_cpu_pct_per_wf": pct("soma_process_cpu_s_per_wf_s"),
        "wms_p50_ms": out.get("wms_p50_ms"), "wms_p99_ms": out.get("wms_p99_ms"),
        "wms_ratio": ratio("wms_p50_ms", "wms_future_p50_ms"),
        "wms_cpu_pct_per_wf": pct("wms_process_cpu_s_per_wf_s"),
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**out, **{k: v for k, v in summary.items() if v is not None}}, fh, indent=1)
    print("BENCH poll_backends " + " ".join(f"{k}={_f(v)}" for k, v in summary.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Diff junit results of transformers' Trainer tests: bare (`none`) against each attach mode.

    python benchmarks/hf_trainer_suite/compare.py [RESULTS_DIR]   # default /tmp/hf_trainer_suite/results

Prints per-mode counts (passed / failed / skipped, per file and in total) and every test that passes
bare and does not pass in a mode ("regressions"), with the first line of its failure message.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

MODES = ("none", "wrapper", "attach", "callbacks")


def outcomes(xml_path: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of the message)."""
    out: dict[str, tuple[str, str]] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        outcome, msg = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, msg = "failed", (child.get("message") or child.text or "").strip().splitlines()[:1]
                msg = msg[0] if msg else ""
                break
            if child.tag == "skipped":
                outcome = "skipped"
        # a teardown error after a pass is reported as a second testcase entry with the same id
        if tid in out and out[tid][0] == "failed":
            continue
        out[tid] = (outcome, msg)
    return out


def main(results: Path) -> int:
    files = sorted({p.stem for m in MODES for p in (results / m).glob("*.xml")})
    table = []
    regressions: dict[str, list[tuple[str, str]]] = {}
    fixed: dict[str, list[str]] = {}
    totals = {m: Counter() for m in MODES}
    for f in files:
        base_path = results / "none" / f"{f}.xml"
        if not base_path.exists():
            continue
        base = outcomes(base_path)
        row = [f]
        for m in MODES:
            p = results / m / f"{f}.xml"
            if not p.exists():
                row.append("-")
                continue
            res = outcomes(p)
            c = Counter(o for o, _ in res.values())
            totals[m].update(c)
            row.append(f"{c['passed']}/{c['failed']}/{c['skipped']}")
            if m == "none":
                continue
            for tid, (o, _) in base.items():
                got = res.get(tid, ("missing", ""))
                if o == "passed" and got[0] != "passed":
                    regressions.setdefault(m, []).append((tid, got[1]))
                if o == "failed" and got[0] == "passed":
                    fixed.setdefault(m, []).append(tid)
        table.append(row)
    print("| file | " + " | ".join(f"{m} p/f/s" for m in MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for row in table:
        print("| " + " | ".join(row) + " |")
    print("| **total** | " + " | ".join(
        f"{totals[m]['passed']}/{totals[m]['failed']}/{totals[m]['skipped']}" for m in MODES) + " |")
    for m in MODES[1:]:
        regs = regressions.get(m, [])
        print(f"\n## {m}: {len(regs)} pass bare, fail with the plugin")
        for tid, msg in regs:
            print(f"- {tid}: {msg[:200]}")
        if fixed.get(m):
            print(f"  (fail bare, pass in {m}: {', '.join(fixed[m])})")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/hf_trainer_suite/results")))

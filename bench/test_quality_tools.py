#!/usr/bin/env python3
"""Checks of the quality run's tools, run by scripts/test.sh (no model, no peers needed):

1. bench/results/quality.md, .json and .svg are what bench/quality_report.py makes of the
   committed raw outputs (bench/results/quality-raw) and notes: the report is not edited by hand.
2. bench/quality_merge.py joins parts of a kvq run in order, and refuses parts whose fp32
   references differ or whose ids differ (they would not be one run).
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, ok=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if ok and p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def check_report_is_rebuilt_from_raw():
    with tempfile.TemporaryDirectory() as out:
        run("bench/quality_report.py", "--raw", "bench/results/quality-raw", "--out", out,
            "--notes", "bench/results/quality-notes.md")
        for name in ("quality.md", "quality.svg"):
            got = open(os.path.join(out, name)).read()
            want = open(os.path.join(ROOT, "bench/results", name)).read()
            assert got == want, f"bench/results/{name} differs from what quality_report.py makes of quality-raw"
        got = json.load(open(os.path.join(out, "quality.json")))
        want = json.load(open(os.path.join(ROOT, "bench/results/quality.json")))
        assert got == want, "bench/results/quality.json differs from what quality_report.py makes of quality-raw"
    print("quality report: rebuilt from its raw outputs, identical")


def part(rows, nll, ids=(1, 2, 3)):
    ref = {"cache": "fp32", "predicted": len(ids) - 1, "nll": nll, "ppl": 2.0, "kl": 0.0, "top1_agreement": 1.0,
           "bytes": 10, "bytes_per_token": 5.0, "effective_bits": 32.0, "seconds": 1.0}
    out = {"chunk": 64, "context": 8, "mode": "m", "text": "t", "tokens": len(ids), "weights": "stored",
           "reference": ref, "rows": [dict(ref, cache=r) for r in rows]}
    return out, {"documents": [{"name": "t", "ids": list(ids)}]}


def check_merge_parts():
    with tempfile.TemporaryDirectory() as d:
        def write(i, p, ids):
            json.dump(p, open(os.path.join(d, f"part-kvq-t-8-{i}.json"), "w"))
            json.dump(ids, open(os.path.join(d, f"part-kvq-ids-t-8-{i}.json"), "w"))
        write(0, *part(["a", "b"], 1.25))
        write(1, *part(["c"], 1.25))
        parts = [os.path.join(d, f"part-kvq-t-8-{i}.json") for i in (0, 1)]
        out, ids_out = os.path.join(d, "kvq-t-8.json"), os.path.join(d, "kvq-ids-t-8.json")
        run("bench/quality_merge.py", "parts", "--out", out, "--ids-out", ids_out, *parts)
        merged = json.load(open(out))
        assert [r["cache"] for r in merged["rows"]] == ["a", "b", "c"], merged["rows"]
        assert json.load(open(ids_out))["documents"][0]["ids"] == [1, 2, 3]
        # Another fp32 reference: not the same run.
        write(1, *part(["c"], 1.2500001))
        p = run("bench/quality_merge.py", "parts", "--out", out, "--ids-out", ids_out, *parts, ok=False)
        assert p.returncode != 0 and "reference differs" in p.stderr, p.stderr
        # Other ids.
        write(1, *part(["c"], 1.25, ids=(1, 2, 4)))
        p = run("bench/quality_merge.py", "parts", "--out", out, "--ids-out", ids_out, *parts, ok=False)
        assert p.returncode != 0 and "other ids" in p.stderr, p.stderr
    print("quality_merge.py parts: merges in order, refuses other references and other ids")


if __name__ == "__main__":
    check_report_is_rebuilt_from_raw()
    check_merge_parts()

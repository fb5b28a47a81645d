#!/usr/bin/env python3
"""Joins the pieces of a quality run (bench/quality.sh) that ran apart.

  quality_merge.py parts --out kvq-DOC-CTX.json --ids-out kvq-ids-DOC-CTX.json PART...
      `kvq ppl --json` outputs over parts of one cache list (KVQ_QUALITY_SPLIT): checks that every
      part scored the same ids with the same settings and got the same fp32 reference (the
      reference is recomputed by each part, so equal numbers also show the run is deterministic),
      then writes one output with the rows in the parts' order.

  quality_merge.py peers --into RAW --from OTHER_RAW --tools llama,hf [--files PATTERNS]
      Copies the peers' outputs (llama-*.json, hf-*.json; or the files PATTERNS names, such as kvq
      parts finished elsewhere, --tools kvq) of a run made on another machine into RAW, after checking that both runs scored the very same ids, and records in RAW/meta.json
      which tools ran where, so the report can say it. The settings must match, or it refuses.
"""
import argparse
import fnmatch
import json
import os
import shutil
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def fail(msg):
    print(f"quality_merge.py: {msg}", file=sys.stderr)
    sys.exit(1)


def merge_parts(a):
    parts = [load(p) for p in a.parts]
    first = parts[0]
    for p, j in zip(a.parts[1:], parts[1:]):
        for k in ("chunk", "context", "mode", "text", "tokens", "weights"):
            if j.get(k) != first.get(k):
                fail(f"{p}: {k} = {j.get(k)!r}, but {a.parts[0]} has {first.get(k)!r}")
        r0, r1 = first["reference"], j["reference"]
        if r0["predicted"] != r1["predicted"] or abs(r0["nll"] - r1["nll"]) > 1e-9 * max(1.0, abs(r0["nll"])):
            fail(f"{p}: its fp32 reference differs from {a.parts[0]}'s (NLL {r1['nll']!r} vs {r0['nll']!r}): "
                 "the parts are not the same run")
    ids_paths = [os.path.join(os.path.dirname(p), os.path.basename(p).replace("part-kvq-", "part-kvq-ids-", 1))
                 for p in a.parts]
    ids = [load(p) for p in ids_paths]
    for p, j in zip(ids_paths[1:], ids[1:]):
        if j != ids[0]:
            fail(f"{p}: other ids than {ids_paths[0]}")
    merged = dict(first)
    merged["rows"] = [r for j in parts for r in j["rows"]]
    merged["reference"] = dict(first["reference"])
    # Time: the reference ran once per part; keep the first part's, as a single run would have.
    merged["merged_from"] = [os.path.basename(p) for p in a.parts]
    with open(a.out + ".part", "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(a.out + ".part", a.out)
    with open(a.ids_out, "w") as f:
        json.dump(ids[0], f)
    print(f"merged {len(parts)} parts, {len(merged['rows'])} rows, into {a.out}", file=sys.stderr)


def merge_peers(a):
    into, other = a.into, getattr(a, "from")
    m_into, m_other = load(os.path.join(into, "meta.json")), load(os.path.join(other, "meta.json"))
    for k in ("tokens", "contexts", "chunk", "documents"):
        if m_into["settings"].get(k) != m_other["settings"].get(k):
            fail(f"settings differ in {k}: {m_into['settings'].get(k)!r} here, {m_other['settings'].get(k)!r} in {other}")
    if load(os.path.join(into, "ids.json")) != load(os.path.join(other, "ids.json")):
        fail(f"{other}/ids.json differs from {into}/ids.json: the runs did not score the same ids")
    prefix = {"llama": "llama", "llama.cpp": "llama", "hf": "hf", "transformers": "hf", "kvq": "kvq"}
    if any(t not in prefix for t in a.tools.split(",")):
        fail(f"--tools takes llama, hf and kvq, not {a.tools!r}")
    tools = [prefix[t] for t in a.tools.split(",")]
    if "kvq" in tools and not a.files:
        fail("--tools kvq needs --files: which of kvq's outputs ran there")
    copied = []
    for name in sorted(os.listdir(other)):
        wanted = (any(fnmatch.fnmatch(name, g) for g in a.files.split(",")) if a.files else
                  any(name.startswith(t + "-") and name.endswith(".json") for t in tools))
        if wanted:
            shutil.copyfile(os.path.join(other, name), os.path.join(into, name))
            copied.append(name)
    if not copied:
        fail(f"no {a.files or a.tools} outputs in {other}")
    # Their steps and commands join this run's log.
    for log in ("steps.jsonl", "commands.txt"):
        src = os.path.join(other, log)
        if os.path.exists(src):
            lines = [l for l in open(src) if any(f" {c}" in l or f"/{c}" in l for c in copied)]
            with open(os.path.join(into, log), "a") as f:
                f.writelines(lines)
    peers = set(filter(None, m_into["settings"]["peers"].split(","))) - {"none"}
    peers |= {"llama.cpp" if t == "llama" else "hf" for t in tools if t != "kvq"}
    m_into["settings"]["peers"] = ",".join(p for p in ("hf", "llama.cpp") if p in peers)
    m_into.setdefault("parts", []).append({
        "tools": [{"llama": "llama.cpp", "hf": "transformers", "kvq": "kvq"}[t] for t in tools],
        "machine": m_other["machine"], "commit": m_other["commit"], "dirty": m_other["dirty"],
        "date_utc": m_other["date_utc"], "files": copied})
    s = m_into["settings"]
    s["full"] = bool(s.get("defaults")) and bool(s.get("kvq")) and s["peers"] == "hf,llama.cpp"
    with open(os.path.join(into, "meta.json"), "w") as f:
        json.dump(m_into, f, indent=1)
    print(f"copied {len(copied)} files from {other}: {', '.join(copied)}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parts")
    p.add_argument("--out", required=True)
    p.add_argument("--ids-out", required=True)
    p.add_argument("parts", nargs="+")
    q = sub.add_parser("peers")
    q.add_argument("--into", required=True)
    q.add_argument("--from", required=True)
    q.add_argument("--tools", required=True, help="llama, hf or kvq, comma-separated: what ran there")
    q.add_argument("--files", help="comma-separated file patterns to copy (default: every output of --tools); "
                   "needed for kvq, whose outputs are parts of this run's")
    a = ap.parse_args()
    merge_parts(a) if a.cmd == "parts" else merge_peers(a)


if __name__ == "__main__":
    main()

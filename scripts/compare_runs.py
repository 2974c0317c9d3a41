#!/usr/bin/env python3
"""Compares two scripts/stage_runs.sh output directories: every field of every metrics.jsonl
line except the measured speed (samples_per_s), and the bytes of every model.safetensors.
Exits 1 on the first difference it reports.

    scripts/compare_runs.py /tmp/runs-before /tmp/runs-after
"""
import hashlib
import json
import sys
from pathlib import Path

TIMING = {"samples_per_s"}


def same_record(x, y):
    """Equal fields; a loss term one side leaves out and the other logs as null counts as equal
    (a stage logs the terms its objective names; older builds logged every LLaVA-KD term)."""
    keys = set(x) | set(y)
    return all(x.get(k) == y.get(k) for k in keys)


def metrics(path):
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append({k: v for k, v in json.loads(line).items() if k not in TIMING})
    return rows


def main(a, b):
    a, b = Path(a), Path(b)
    bad = 0
    files = sorted(p.relative_to(a) for p in a.rglob("metrics.jsonl"))
    if not files:
        sys.exit(f"no metrics.jsonl under {a}")
    for rel in files:
        ma, mb = metrics(a / rel), metrics(b / rel)
        if len(ma) == len(mb) and all(same_record(x, y) for x, y in zip(ma, mb)):
            print(f"same  {rel} ({len(ma)} steps, {len(ma[0]) if ma else 0} fields)")
        else:
            bad += 1
            first = next((i for i, (x, y) in enumerate(zip(ma, mb)) if not same_record(x, y)), min(len(ma), len(mb)))
            print(f"DIFF  {rel} at step {first + 1}:\n  {ma[first] if first < len(ma) else None}\n  {mb[first] if first < len(mb) else None}")
    for pa in sorted(a.rglob("model.safetensors")):
        rel = pa.relative_to(a)
        ha = hashlib.sha256(pa.read_bytes()).hexdigest()
        pb = b / rel
        hb = hashlib.sha256(pb.read_bytes()).hexdigest() if pb.exists() else None
        print(f"{'same' if ha == hb else 'DIFF'}  {rel}")
        bad += ha != hb
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(*sys.argv[1:3])

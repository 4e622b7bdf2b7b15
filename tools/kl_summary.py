#!/usr/bin/env python3
"""Table and paired comparisons of `duo perplexity --kl-divergence --json` runs named
kl_<text>_<model>_<pattern>_k<heads>.json (<pattern> has no underscore), as written by
scripts/gpu_pattern_oracle.sh and scripts/gpu_identify_labels.sh.

  tools/kl_summary.py RESULTS_DIR --pairs oracle:gate,oracle:heuristic,gate:heuristic

For each pair A:B and each (text, model, heads) that has both runs: the mean over windows of
KL_B - KL_A with its standard error, and in how many windows A's KL is lower.
"""
import argparse
import glob
import json
import os
import re


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results")
    ap.add_argument("--pairs", required=True, help="comma-separated A:B pattern names")
    a = ap.parse_args()
    runs = {}
    for f in sorted(glob.glob(os.path.join(a.results, "kl_*.json"))):
        m = re.match(r"kl_(.+)_(mha|gqa)_([^_]+)_k(\d+)\.json$", os.path.basename(f))
        if m:
            runs[(m.group(1), m.group(2), int(m.group(4)), m.group(3))] = json.load(open(f))
    print("%-14s %-4s %5s %-16s %10s %10s %8s %9s" % ("text", "model", "heads", "pattern", "KL", "+/-",
                                                     "same%", "PPL"))
    for (t, m, k, p), j in sorted(runs.items()):
        print("%-14s %-4s %5d %-16s %10.5f %10.5f %8.2f %9.3f" % (
            t, m, j["retrieval_kv_heads"], p, j["kl"], j["kl_stderr"], 100 * j["same_top"], j["perplexity"]))
        if j["retrieval_kv_heads"] != k:
            print("  WARNING: the name says %d heads" % k)
    print("\npaired by window: mean of KL_B - KL_A +/- standard error; windows where A is lower")
    for pair in a.pairs.split(","):
        pa, pb = pair.split(":")
        for (t, m, k, p), ja in sorted(runs.items()):
            jb = runs.get((t, m, k, pb))
            if p != pa or jb is None:
                continue
            d = [y["kl"] - x["kl"] for x, y in zip(ja["per_window"], jb["per_window"])]
            n = len(d)
            mean = sum(d) / n
            se = (sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5 if n > 1 else 0.0
            print("  %-14s %-4s %2d heads  A=%-12s B=%-12s %+.5f +/- %.5f  A lower in %d of %d" % (
                t, m, k, pa, pb, mean, se, sum(x > 0 for x in d), n))


if __name__ == "__main__":
    main()

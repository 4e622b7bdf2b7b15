#!/usr/bin/env python3
"""Draw KL(full || pattern) against retrieval KV heads kept, one line per head pattern, from the
JSON files of `duo perplexity --kl-divergence` (as written by scripts/gpu_pattern_kl.sh:
kl_<text>_<model>_<pattern>_<sparsity>.json and kl_<text>_<model>_streaming-only.json).

  tools/plot_pattern_kl.py RESULTS_DIR MODEL OUT.png [ORACLE_DIR]    # MODEL: mha or gqa

One panel per text; log-scale KL; full attention's KL is 0 (not drawn). ORACLE_DIR adds the greedy
KL oracle of scripts/gpu_pattern_oracle.sh (kl_<text>_<model>_oracle_k<heads>.json) as a dashed
line."""
import glob
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TEXTS = {"haystack": "books (data/haystack)", "heldout_sotu": "speeches (state_union 1991-2006)"}
LABELS = {
    "pattern-gate": "gate (duo identify)",
    "pattern-gate-all-labels": "gate, --labels all",
    "pattern-gate-duo-data": "gate, --data duo",
    "pattern-heuristic": "heuristic, needle mass",
    "pattern-heuristic-deviation": "heuristic, deviation",
}


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    results, model, out = sys.argv[1:4]
    runs = {}  # text -> pattern -> [(heads, kl, stderr)]
    streaming = {}
    for f in sorted(glob.glob(os.path.join(results, f"kl_*_{model}_*.json"))):
        m = re.match(rf"kl_(.+)_{model}_(.+?)(?:_([0-9.]+))?\.json$", os.path.basename(f))
        if not m:
            continue
        text, pattern = m.group(1), m.group(2)
        j = json.load(open(f))
        if pattern == "streaming-only":
            streaming[text] = j["kl"]
            continue
        pattern = "random (seed 7)" if pattern.startswith("pattern-random") else LABELS.get(pattern, pattern)
        runs.setdefault(text, {}).setdefault(pattern, []).append(
            (j["retrieval_kv_heads"], j["kl"], j["kl_stderr"]))
    if not runs:
        sys.exit(f"no kl_*_{model}_*.json files in {results}")
    oracle = {}  # text -> [(heads, kl, stderr)]
    if len(sys.argv) == 5:
        for f in sorted(glob.glob(os.path.join(sys.argv[4], f"kl_*_{model}_oracle_k*.json"))):
            text = re.match(rf"kl_(.+)_{model}_oracle_k\d+\.json$", os.path.basename(f)).group(1)
            j = json.load(open(f))
            oracle.setdefault(text, []).append((j["retrieval_kv_heads"], j["kl"], j["kl_stderr"]))
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4), squeeze=False)
    for ax, (text, pats) in zip(axes[0], sorted(runs.items())):
        for pattern, pts in sorted(pats.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        marker="o", capsize=3, label=pattern)
        if text in oracle:
            pts = sorted(oracle[text])
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], color="black",
                        ls="--", marker="x", capsize=3, label="greedy KL oracle (reference)")
        if text in streaming:
            ax.axhline(streaming[text], color="gray", ls="--", label="streaming only")
        heads = sorted({p[0] for pts in pats.values() for p in pts})
        ax.set_xscale("log", base=2)
        ax.set_xticks(heads)
        ax.set_xticklabels([str(h) for h in heads])
        ax.set_yscale("log")
        ax.set_xlabel("retrieval KV heads kept")
        ax.set_ylabel("KL(full || pattern), nats per token")
        ax.set_title(f"duo-demo-{model}, held-out {TEXTS.get(text, text)}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Depth x length heatmaps of `duo niah --json` results, several modes side by side (PNG).

    python3 tools/plot_niah.py full.json duo.json streaming.json -o docs/niah.png
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402


def grid(res, metric):
    lengths, depths = res["lengths"], res["depths"]
    cell = {(r["length"], r["depth"]): float(r[metric]) for r in res["results"]}
    return [[cell.get((L, d), float("nan")) for L in lengths] for d in depths], lengths, depths


def title(res):
    mode = res["attention"]
    if mode == "DuoAttention":
        name = os.path.basename(os.path.dirname(res["pattern"])) or res["pattern"]
        mode += f" ({name})\n{res['rule']}: {res['retrieval_kv_heads']} retrieval KV heads"
    elif mode == "streaming only":
        mode += f" (S={res['sink']}, R={res['recent']})"
    return f"{mode}\nmean score {res['mean_score']:.3f}, exact match {res['exact_match']:.3f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+", help="duo niah --json files")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--title", default=None)
    ap.add_argument("--metric", choices=["score", "exact"], default="score",
                    help="cell colour: score (share of answer words, the paper's) or exact (exact match)")
    a = ap.parse_args()
    results = [json.load(open(p)) for p in a.inputs]
    cmap = LinearSegmentedColormap.from_list("niah", ["#d7191c", "#fdae61", "#ffffbf", "#a6d96a", "#1a9641"])
    fig, axes = plt.subplots(1, len(results), figsize=(5.6 * len(results), 4.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        g, lengths, depths = grid(res, a.metric)
        im = ax.imshow(g, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{L // 1000}K" if L >= 1000 else str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0f}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(title(res), fontsize=10)
        for i, row in enumerate(g):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8,
                 label="score (share of answer words)" if a.metric == "score" else "exact match")
    fig.suptitle(a.title or f"Needle in a haystack: {results[0]['model']} ({results[0]['task']})", fontsize=11, y=1.06)
    fig.savefig(a.output, dpi=110, bbox_inches="tight")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Draw head patterns (the published format: full_attention_heads.tsv, one row per layer, one
gate per KV head) as layer x head heatmaps, side by side, and optionally the gate optimisation's
loss curve from a pattern's train_log.json (written by `duo identify --method gate`).

    python3 tools/plot_pattern.py models/duo-demo-mha/pattern-gate models/duo-demo-mha/pattern-heuristic \
        --loss models/duo-demo-mha/pattern-gate -o docs/pattern_duo-demo-mha.png

Panels are titled with the directory name (or --titles). The colour scale is the gate value,
clipped to [0, 1] (trained gates may sit slightly outside it, as in the published patterns).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_gates(pattern_dir: Path) -> list[list[float]]:
    tsv = pattern_dir / "full_attention_heads.tsv"
    if not tsv.is_file():
        sys.exit(f"plot_pattern: {tsv} not found")
    rows = []
    for i, line in enumerate(tsv.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append([float(x) for x in line.replace(",", "\t").split()])
        except ValueError:
            sys.exit(f"plot_pattern: {tsv}:{i + 1}: not a row of numbers")
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        sys.exit(f"plot_pattern: {tsv}: expected equal-length rows (one per layer)")
    return rows


def load_loss(pattern_dir: Path) -> tuple[list[int], list[float], list[float]]:
    log = pattern_dir / "train_log.json"
    if not log.is_file():
        sys.exit(f"plot_pattern: {log} not found (only gate runs write one)")
    try:
        steps = json.loads(log.read_text())["steps"]
        return ([s["step"] for s in steps], [s["loss"] for s in steps],
                [s["distill_loss"] for s in steps])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        sys.exit(f"plot_pattern: {log}: malformed ({e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("patterns", nargs="+", type=Path, help="pattern directories")
    ap.add_argument("--titles", nargs="+", default=None, help="one title per pattern")
    ap.add_argument("--loss", type=Path, default=None, help="pattern directory whose train_log.json to plot")
    ap.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    a = ap.parse_args()
    if a.titles and len(a.titles) != len(a.patterns):
        sys.exit("plot_pattern: --titles needs one title per pattern")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    gates = [np.array(load_gates(p)) for p in a.patterns]
    panels = len(gates) + (1 if a.loss else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels + 1, 3.6), squeeze=False)
    axes = axes[0]
    im = None
    for i, (g, p) in enumerate(zip(gates, a.patterns)):
        ax = axes[i]
        im = ax.imshow(np.clip(g, 0, 1), cmap="viridis", vmin=0, vmax=1, aspect="auto",
                       interpolation="nearest")
        ax.set_title(a.titles[i] if a.titles else p.name, fontsize=9)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(g.shape[1]))
        ax.set_yticks(range(g.shape[0]))
    fig.colorbar(im, ax=list(axes[:len(gates)]), label="gate", shrink=0.85)
    if a.loss:
        steps, loss, distill = load_loss(a.loss)
        ax = axes[-1]
        ax.plot(steps, loss, label="loss (distill + reg)", lw=0.8)
        ax.plot(steps, distill, label="distillation", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{a.loss.name}: loss", fontsize=9)
        ax.legend(fontsize=7)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.output, dpi=110, bbox_inches="tight")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()

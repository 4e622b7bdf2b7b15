#!/usr/bin/env python3
"""Greedy "oracle" head pattern: the retrieval KV heads chosen directly by the measure they are
judged on, to see how much room any identification method has on a model.

Forward selection: start with every KV head streaming; at each step, try each remaining head as a
retrieval head and keep the one whose pattern gives the lowest mean KL(full || pattern) on the
calibration windows (`duo perplexity --kl-divergence`, token-weighted over all calibration texts).
Greedy is not exhaustive (C(32, 8) is 10.5 million sets), so this is a strong reference, not a
proof of optimality; it is tuned on the calibration windows, which favours it there.

Writes OUT/greedy.json (every step: chosen head, calibration KL of every candidate) and, for each
--keep k, the oracle's pattern directory OUT/pattern-oracle-k<k> (gates 1 / 0; load with
--threshold 0.5). Progress on stderr.

  tools/head_oracle.py --duo DUO -m MODEL --calib TEXT:WINDOWS [--calib ...] --max-heads 8
      --keep 2,4,8 -o OUT [--par 12] [--ctx 16384] [--sink 64] [--recent 256] [--backend cuda]
"""
import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time


def read_shape(model):
    c = json.load(open(os.path.join(model, "config.json")))
    return c["num_hidden_layers"], c.get("num_key_value_heads", c["num_attention_heads"])


def write_pattern(d, layers, kv_heads, heads, sink, recent, note):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "full_attention_heads.tsv"), "w") as f:
        for l in range(layers):
            f.write("\t".join("%.18e" % (1.0 if (l, h) in heads else 0.0) for h in range(kv_heads)))
            f.write("\n")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"sink_size": sink, "recent_size": recent, "method": note,
                   "retrieval_heads": sorted([list(x) for x in heads])}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duo", required=True)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--calib", action="append", required=True, help="TEXT:WINDOWS (0 = all)")
    ap.add_argument("--max-heads", type=int, required=True)
    ap.add_argument("--keep", default="", help="comma-separated head counts to write patterns for")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--par", type=int, default=12)
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--recent", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--backend", default="cuda")
    a = ap.parse_args()
    layers, kv_heads = read_shape(a.model)
    if not 0 < a.max_heads <= layers * kv_heads:
        sys.exit("head_oracle: --max-heads must be in 1..%d" % (layers * kv_heads))
    calib = []
    for c in a.calib:
        text, _, w = c.rpartition(":")
        if not text or not w.isdigit():
            sys.exit("head_oracle: --calib wants TEXT:WINDOWS, got %r" % c)
        calib.append((text, int(w)))
    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(a.out, "work")
    t0 = time.time()

    def evaluate(heads):
        """Token-weighted mean KL over the calibration texts of the pattern keeping `heads`."""
        tag = "_".join("%d.%d" % x for x in sorted(heads))
        d = os.path.join(work, "p_" + tag)
        write_pattern(d, layers, kv_heads, heads, a.sink, a.recent, "greedy oracle candidate")
        kl_sum = tokens = 0
        for i, (text, w) in enumerate(calib):
            js = os.path.join(d, "kl_%d.json" % i)
            cmd = [a.duo, "perplexity", "-m", a.model, "--text", text, "--ctx", str(a.ctx),
                   "--windows", str(w), "--chunk", str(a.chunk), "--sink", str(a.sink),
                   "--recent", str(a.recent), "--kl-divergence", "--backend", a.backend,
                   "--pattern", d, "--threshold", "0.5", "--json", js]
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                raise RuntimeError("%s failed: %s" % (" ".join(cmd), r.stderr[-500:]))
            j = json.load(open(js))
            if j["retrieval_kv_heads"] != len(heads):
                raise RuntimeError("pattern %s kept %d heads, wanted %d" % (d, j["retrieval_kv_heads"], len(heads)))
            kl_sum += j["kl"] * j["tokens_scored"]
            tokens += j["tokens_scored"]
        return kl_sum / tokens

    chosen, steps = [], []
    keep = {int(k) for k in a.keep.split(",") if k}
    with cf.ThreadPoolExecutor(a.par) as pool:
        for step in range(a.max_heads):
            cand = [(l, h) for l in range(layers) for h in range(kv_heads) if (l, h) not in chosen]
            kls = list(pool.map(lambda x: evaluate(set(chosen) | {x}), cand))
            best = min(range(len(cand)), key=lambda i: (kls[i], cand[i]))
            chosen.append(cand[best])
            steps.append({"heads": len(chosen), "added": list(cand[best]), "calib_kl": kls[best],
                          "candidates": [{"head": list(c), "calib_kl": k} for c, k in zip(cand, kls)]})
            print("head_oracle: %d heads, added layer %d head %d, calibration KL %.6f (%.0f s)" % (
                len(chosen), cand[best][0], cand[best][1], kls[best], time.time() - t0),
                file=sys.stderr, flush=True)
            if len(chosen) in keep:
                write_pattern(os.path.join(a.out, "pattern-oracle-k%d" % len(chosen)), layers, kv_heads,
                              set(chosen), a.sink, a.recent,
                              "greedy KL oracle, %d heads, calibration %s" % (len(chosen), a.calib))
            json.dump({"model": a.model, "calib": a.calib, "ctx": a.ctx, "sink": a.sink,
                       "recent": a.recent, "order": [list(c) for c in chosen], "steps": steps,
                       "seconds": time.time() - t0},
                      open(os.path.join(a.out, "greedy.json"), "w"), indent=1)


if __name__ == "__main__":
    main()

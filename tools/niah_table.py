#!/usr/bin/env python3
"""Markdown table rows from `duo niah --json` results: exact match and word score per length, overall,
and over the prompts whose needle lies wholly outside the streaming window (sink + recent tokens).

    python3 tools/niah_table.py full.json streaming.json [...]

A needle is outside the window when it starts at or after the sink and ends before the last `recent`
tokens of the prompt (needle tokens = tokenizer("\\n" + needle + "\\n"), as duo builds the prompt; the
tokenizer is read from the model directory named in the JSON, or --model-dir).
"""
import argparse
import json
import os


def needle_tokens(model_dir, answer):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return len(tok.encode("\n" + answer + "\n", add_special_tokens=False).ids)


def needle_text(r, task):
    if task == "passkey":  # passkey_needle() in src/eval/niah.cpp
        return f"The pass key is {r['answer']}. Remember it. {r['answer']} is the pass key."
    return r["answer"]  # sentence task: the answer is the needle


def summarize(res, model_dir=None):
    rows = res["results"]
    lengths = res["lengths"]
    sink, recent = res.get("sink", 0), res.get("recent", 0)
    mdir = model_dir or res["model"]
    cache = {}
    outside = []
    for r in rows:
        text = needle_text(r, res["task"])
        if text not in cache:
            cache[text] = needle_tokens(mdir, text)
        n = cache[text]
        if r["needle_position"] >= sink and r["needle_position"] + n <= r["length"] - recent:
            outside.append(r)

    def mean(rs, k):
        return sum(float(r[k]) for r in rs) / len(rs) if rs else float("nan")

    return {
        "by_length": {L: (mean([r for r in rows if r["length"] == L], "exact"),
                          mean([r for r in rows if r["length"] == L], "score")) for L in lengths},
        "exact": mean(rows, "exact"), "score": mean(rows, "score"),
        "outside": (mean(outside, "exact"), mean(outside, "score"), len(outside)), "count": len(rows),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--model-dir", default=None, help="tokenizer location if the JSON's model path is stale")
    a = ap.parse_args()
    first = json.load(open(a.inputs[0]))
    head = " | ".join(f"{L // 1000}K" if L >= 1000 else str(L) for L in first["lengths"])
    print(f"| file | attention | task | {head} | exact (all) | word score (all) | exact / word score, needle outside S+R |")
    print("|---" * (len(first["lengths"]) + 6) + "|")
    for p in a.inputs:
        res = json.load(open(p))
        s = summarize(res, a.model_dir)
        cells = " | ".join(f"{e:.2f} / {w:.2f}" for e, w in s["by_length"].values())
        oe, ow, on = s["outside"]
        print(f"| {os.path.basename(p)} | {res['attention']} | {res['task']} | {cells} | {s['exact']:.3f} | "
              f"{s['score']:.3f} | {oe:.3f} / {ow:.3f} ({on} of {s['count']}) |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Baseline for `duo bench`: Hugging Face transformers (sdpa attention, bf16, random weights built
from the same config.json, nothing downloaded), full attention, batch 1.

Same protocol as duo bench: for each context N, prefill N random tokens in chunks of --chunk
(timed with device synchronisation), then --warmup-steps untimed and --decode-steps timed greedy
decode steps with the KV cache (DynamicCache); median ms/token; peak device memory
(torch.cuda.max_memory_allocated, i.e. tensors allocated by PyTorch, reset per context).
Prints one JSON object on stdout; progress on stderr.

    python3 bench/baseline_transformers.py --config bench/configs/llama-3-8b-1048k.json \
        --contexts 8000,32000 --decode-steps 50
"""
import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="HF config.json (bench/configs/*.json)")
    ap.add_argument("--contexts", default="20000")
    ap.add_argument("--chunk", type=int, default=32768)
    ap.add_argument("--decode-steps", type=int, default=100)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",") if x]

    with open(args.config) as f:
        cfg_dict = json.load(f)
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    cfg.use_cache = True
    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    with dev:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=args.attn)
    model.eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    weights_bytes = torch.cuda.memory_allocated()
    log(f"baseline: {model_type} loaded in {load_s:.1f} s, {weights_bytes / 2**30:.2f} GiB")
    vocab = cfg.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)

    def forward(ids, cache):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    results = []
    with torch.inference_mode():
        # Warm-up (untimed): kernels, cuBLAS handles.
        cache = DynamicCache(config=cfg)
        logits = forward(torch.randint(0, vocab, (1, min(512, contexts[0])), generator=gen).to(dev), cache)
        for _ in range(2):
            logits = forward(logits.argmax(-1, keepdim=True), cache)
        del cache
        torch.cuda.synchronize()

        for n in contexts:
            r = {"context": n}
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                prompt = torch.randint(0, vocab, (1, n), generator=gen).to(dev)
                cache = DynamicCache(config=cfg)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for p in range(0, n, args.chunk):
                    logits = forward(prompt[:, p : p + args.chunk], cache)
                torch.cuda.synchronize()
                prefill_s = time.perf_counter() - t0
                ms = []
                for i in range(args.warmup_steps + args.decode_steps):
                    nxt = logits.argmax(-1, keepdim=True)
                    torch.cuda.synchronize()
                    s0 = time.perf_counter()
                    logits = forward(nxt, cache)
                    torch.cuda.synchronize()
                    if i >= args.warmup_steps:
                        ms.append((time.perf_counter() - s0) * 1e3)
                r.update(
                    prefill_seconds=prefill_s,
                    prefill_tokens_per_second=n / prefill_s,
                    decode_ms_per_token_median=statistics.median(ms),
                    peak_device_bytes=torch.cuda.max_memory_allocated(),
                )
                log(f"  N={n}: prefill {prefill_s:.3f} s, decode {statistics.median(ms):.2f} ms/token, "
                    f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
                del cache
            except torch.OutOfMemoryError as e:
                r["error"] = "out of memory: " + str(e).split("\n")[0]
                r["peak_device_bytes"] = torch.cuda.max_memory_allocated()
                log(f"  N={n}: OOM")
                cache = None
            results.append(r)

    print(json.dumps({
        "command": " ".join(sys.argv),
        "engine": f"transformers {transformers.__version__} ({args.attn}), torch {torch.__version__}",
        "device": torch.cuda.get_device_name(0),
        "config": args.config,
        "weights": f"random (torch seed {args.seed})",
        "chunk": args.chunk,
        "decode_steps": args.decode_steps,
        "warmup_steps": args.warmup_steps,
        "weights_device_bytes": weights_bytes,
        "load_seconds": load_s,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()

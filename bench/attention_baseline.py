#!/usr/bin/env python3
"""torch SDPA baseline for bench/attention_bench.cu: same shapes, same metrics, JSON lines.

(a) causal prefill, bf16, hd 128, 32 query / 8 KV heads (is_causal=True, enable_gqa=True),
    n = 16K, 32K, 64K: TFLOP/s with causal FLOPs = 4 * n^2 / 2 * d * heads
(b) decode: q of length 1 over a 128K / 512K cache (enable_gqa=True): KV bytes / time
Flags: --quick (prefill at 16K only), --decode-only (no prefill).
Timing: CUDA events, median of 20 runs after warm-up.
"""
import json
import sys

import torch
import torch.nn.functional as F

H, HKV, D = 32, 8, 128


def median_ms(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    quick = "--quick" in sys.argv
    decode_only = "--decode-only" in sys.argv
    dev = torch.device("cuda")
    print(json.dumps({"impl": "torch_sdpa", "device": torch.cuda.get_device_name(0),
                      "torch": torch.__version__}), flush=True)
    for n in (16384, 32768, 65536):
        if decode_only or (quick and n > 16384):
            break
        q = torch.randn(1, H, n, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16)
        ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              enable_gqa=True))
        flops = 4.0 * n * n / 2 * D * H
        print(json.dumps({"impl": "torch_sdpa", "bench": "prefill_causal", "n": n,
                          "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    for ctx in (131072, 524288):
        q = torch.randn(1, H, 1, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, HKV, ctx, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, HKV, ctx, D, device=dev, dtype=torch.bfloat16)
        ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                       warmup=5)
        nbytes = 2.0 * HKV * ctx * D * 2
        print(json.dumps({"impl": "torch_sdpa", "bench": "decode", "ctx": ctx, "ms": round(ms, 4),
                          "kv_bytes": nbytes, "gbps": round(nbytes / ms / 1e6, 1)}), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Train duo's small long-context demo models (Llama architecture) that retrieve across 16K tokens.

Trains one shared byte-level BPE tokenizer and two models:
  models/duo-demo-mha  multi-head attention
  models/duo-demo-gqa  grouped-query attention (4 query heads per KV head)
on public-domain text (--corpus DIR with gutenberg/, inaugural/, state_union/) mixed with synthetic
retrieval tasks (tools/make_needle_data.py).  See docs/demo_models.md.

Typical GPU run (both models, ~9 minutes on one H100):
  python3 tools/train_demo_model.py --corpus .devrun/corpus --out models --model both --time-budget 210
Smoke test on CPU:
  python3 tools/train_demo_model.py --corpus ../shared/corpus --out models --tiny --device cpu
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # main process; data workers force false

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_needle_data as nd  # noqa: E402

T0 = time.time()

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Held-out works (never used for tokenizer or model training; used as eval haystacks).
HELDOUT_GUTENBERG = ["austen-persuasion.txt", "chesterton-thursday.txt", "shakespeare-macbeth.txt"]
HELDOUT_STATE_UNION_FROM = 1991  # state_union/<year>-*.txt with year >= this

ARCHS = {
    # name: (layers, hidden, heads, kv_heads, intermediate)
    # sized so that model.safetensors (bf16) < 16 MiB, and a tar of the model directory too
    "mha": dict(num_hidden_layers=8, hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=640),
    # 8 query heads of 64 over a 256-wide residual (q_dim 512 != hidden), 2 KV heads per layer: the
    # first design (10 layers x 4 q / 1 KV head) did not learn retrieval in 240 s on an H200.
    "gqa": dict(num_hidden_layers=8, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=512, head_dim=64),
}
TINY_ARCHS = {
    "mha": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=1, num_key_value_heads=1,
                intermediate_size=128),
    "gqa": dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                intermediate_size=128),
}


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------------------------
# Corpus + tokenizer
# ----------------------------------------------------------------------------------------------

def list_corpus(corpus: Path):
    train, held = [], []
    for sub in ("gutenberg", "inaugural", "state_union"):
        for p in sorted((corpus / sub).glob("*.txt")):
            is_held = (sub == "gutenberg" and p.name in HELDOUT_GUTENBERG) or \
                      (sub == "state_union" and int(p.name[:4]) >= HELDOUT_STATE_UNION_FROM)
            (held if is_held else train).append(p)
    if not train or not held:
        raise SystemExit(f"corpus at {corpus} is missing files (train={len(train)} held={len(held)})")
    return train, held


def read_text(p: Path) -> str:
    t = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    return t.strip() + "\n\n"


def train_tokenizer(train_files, vocab_size: int, max_chars: int | None, slots):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Text pieces: the training works + the needle vocabulary (so task words are whole tokens).
    def pieces():
        used = 0
        for p in train_files:
            t = read_text(p)
            if max_chars is not None:
                t = t[: max(0, max_chars - used)]
            used += len(t)
            for i in range(0, len(t), 20000):
                yield t[i:i + 20000]
            if max_chars is not None and used >= max_chars:
                break
        rng = random.Random(0)
        for _ in range(300):
            ts = nd.sample_tasks(rng, 6, slots=slots)
            yield nd.format_example_text(nd.FILLER * 3, ts, [rng.random() for _ in ts])
    tok.train_from_iterator(pieces(), trainer=trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def wrap_fast(tok):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   model_max_length=16640, clean_up_tokenization_spaces=False)


def encode_files(tok, files) -> list[np.ndarray]:
    out = []
    for p in files:
        t = read_text(p)
        chunks = [t[i:i + 8000] for i in range(0, len(t), 8000)]
        # split at a newline near the boundary to keep tokenization natural
        ids = []
        carry = ""
        for c in chunks:
            c = carry + c
            j = c.rfind("\n")
            if j > 0 and j < len(c) - 1:
                c, carry = c[: j + 1], c[j + 1:]
            else:
                carry = ""
            ids.append(c)
        if carry:
            ids.append(carry)
        enc = tok.encode_batch(ids, add_special_tokens=False)
        out.append(np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in enc]))
    return out


# ----------------------------------------------------------------------------------------------
# Document construction (token level) -- shared by training and the built-in eval
# ----------------------------------------------------------------------------------------------

class DocBuilder:
    def __init__(self, tok, texts: list[np.ndarray], filler: np.ndarray, bos: int, eos: int):
        self.tok, self.texts, self.filler, self.bos, self.eos = tok, texts, filler, bos, eos
        self.lens = np.array([len(t) for t in texts], dtype=np.float64)

    def enc(self, strings):
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch(strings, add_special_tokens=False)]

    def haystack(self, rng: random.Random, n: int, kind: str) -> np.ndarray:
        if kind == "filler":
            reps = n // len(self.filler) + 2
            off = rng.randrange(len(self.filler)) if rng.random() < 0.5 else 0
            return np.tile(self.filler, reps)[off:off + n]
        parts, need = [], n
        i = rng.choices(range(len(self.texts)), weights=self.lens)[0]
        off = rng.randrange(max(1, len(self.texts[i]) - min(n, len(self.texts[i]) // 2)))
        while need > 0:
            seg = self.texts[i][off:off + need]
            parts.append(seg)
            need -= len(seg)
            i, off = rng.randrange(len(self.texts)), 0
        return np.concatenate(parts)[:n]

    def build(self, rng: random.Random, tasks, total_len: int, hay_kind: str, depths=None,
              seps=None, answer_weight: float = 1.0, for_eval: bool = False):
        """Returns (tokens int32 [total_len], weights float32 [total_len]) where weights[i] is the loss
        weight for PREDICTING token i.  For eval: returns (prompt tokens, answer string)."""
        if seps is None:
            seps = [nd.NEEDLE_SEPS[0] if rng.random() < 0.4 else rng.choice(nd.NEEDLE_SEPS) for _ in tasks]
        needle_strs = [s[0] + t.needle + s[1] for t, s in zip(tasks, seps)]
        asked = [t for t in tasks if t.asked]
        rng.shuffle(asked) if not for_eval else None
        q_strs, a_strs = [], []
        for j, t in enumerate(asked):
            q_strs.append((nd.QUESTION_PREFIX_FIRST if j == 0 else nd.QUESTION_PREFIX_NEXT) + t.question + t.answer_prefix)
            a_strs.append(" " + t.answer + "\n")
        encs = self.enc(needle_strs + q_strs + a_strs)
        n_needle = encs[: len(tasks)]
        n_q = encs[len(tasks): len(tasks) + len(asked)]
        n_a = encs[len(tasks) + len(asked):]
        fixed = 1 + sum(map(len, n_needle)) + sum(map(len, n_q)) + (0 if for_eval else sum(map(len, n_a)) + 1)
        H = total_len - fixed
        if H < 0:
            return None
        hay = self.haystack(rng, H, hay_kind)
        if depths is None:
            depths = [rng.choice([0.0, 1.0]) if rng.random() < 0.1 else rng.random() for _ in tasks]
        order = sorted(range(len(tasks)), key=lambda k: depths[k])
        toks = [np.array([self.bos], np.int32)]
        last = 0
        for k in order:
            p = int(round(depths[k] * H))
            toks.append(hay[last:p])
            toks.append(n_needle[k])
            last = p
        toks.append(hay[last:])
        if for_eval:
            toks.append(n_q[0])
            return np.concatenate(toks), asked[0].answer
        wts = [np.ones(sum(len(t) for t in toks), np.float32)]
        for q, a in zip(n_q, n_a):
            toks += [q, a]
            wts += [np.ones(len(q), np.float32), np.full(len(a), 2.0, np.float32)]
        toks.append(np.array([self.eos], np.int32))
        wts.append(np.ones(1, np.float32))
        tk, wt = np.concatenate(toks), np.concatenate(wts)
        assert len(tk) == total_len, (len(tk), total_len)
        return tk, wt


_W: dict = {}


def _worker_init(state):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    _W["b"] = DocBuilder(Tokenizer.from_str(state["tok"]), state["texts"], state["filler"],
                         state["bos"], state["eos"])
    _W["slots"] = nd.SlotSource(state["slot_text"])
    _W["aw"] = state["answer_weight"]
    _W["seed"] = state["seed"]


def make_batch(batch_idx: int, seq_len: int, rows: int, easy: bool):
    """Deterministic in (seed, batch_idx, seq_len, rows, easy). Rows have seq_len+1 tokens."""
    b = _W["b"]
    rng = random.Random(_W["seed"] * 1_000_003 + batch_idx)
    toks = np.empty((rows, seq_len + 1), np.int32)
    wts = np.empty((rows, seq_len + 1), np.float32)
    for r in range(rows):
        max_needles = max(1, min(16, 1 + seq_len // 1024))
        while True:
            tasks = nd.sample_tasks(rng, max_needles, easy=easy, slots=_W["slots"])
            kind = "filler" if rng.random() < 0.25 else "text"
            out = b.build(rng, tasks, seq_len + 1, kind, answer_weight=_W["aw"])
            if out is not None:
                break
        toks[r], wts[r] = out
    return toks, wts


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------

def seq_len_for(progress: float, step: int, seed: int, max_len: int, tiny: bool) -> int:
    if tiny:
        stages = [(0.3, 256), (0.6, 512)]
        final = [(1024, 1.0)]
    else:
        stages = [(0.10, 1024), (0.22, 2048), (0.36, 4096), (0.50, 8192)]
        final = [(max_len, 0.55), (8192, 0.2), (4096, 0.15), (2048, 0.10)]
    for p, L in stages:
        if progress < p:
            return L
    r = random.Random(seed * 7919 + step).random()
    acc = 0.0
    for L, w in final:
        acc += w
        if r < acc:
            return L
    return final[0][0]


def lr_at(step: int, progress: float, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    w = min(1.0, (step + 1) / warmup)
    c = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * w * c


# ----------------------------------------------------------------------------------------------
# Eval
# ----------------------------------------------------------------------------------------------

def greedy(model, ids, max_new, nl_ids, device):
    import torch
    x = torch.tensor(ids, dtype=torch.long, device=device)[None]
    out = []
    with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                                         enabled=device.startswith("cuda")):
        res = model(input_ids=x, use_cache=True, logits_to_keep=1)
        past = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        for _ in range(max_new):
            out.append(nxt)
            if nxt in nl_ids:
                break
            res = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
    return out


def run_eval(model, builder: DocBuilder, held_builder: DocBuilder, tok, lengths, depths, device, seed):
    model.eval()
    nl_ids = {i for i in range(tok.get_vocab_size()) if "\n" in tok.decode([i])}
    rng = random.Random(seed + 12345)
    results = {}
    for name in ("passkey_filler", "passkey_text", "sentence_text"):
        rows = []
        for L in lengths:
            for d in depths:
                if name == "sentence_text":
                    task = nd.classic_sentence_task()
                else:
                    task = nd.make_passkey(rng, wording=0, ndigits=5, question=0)
                kind = "filler" if name == "passkey_filler" else "text"
                prompt, ans = held_builder.build(rng, [task], L, kind, depths=[d], seps=[nd.CANONICAL_SEP],
                                                 for_eval=True)
                gen = greedy(model, prompt.tolist(), 48 if name.startswith("sentence") else 12, nl_ids, device)
                text = tok.decode(gen).split("\n")[0].strip()
                exact = float(text == ans)
                aw = ans.lower().replace(".", "").split()
                gw = set(text.lower().replace(".", "").split())
                score = sum(w in gw for w in aw) / len(aw)
                rows.append(dict(length=L, depth=d, exact=exact, score=score, answer=ans, generated=text))
        results[name] = rows
    summary = {}
    for name, rows in results.items():
        summary[name] = {
            "exact": sum(r["exact"] for r in rows) / len(rows),
            "score": sum(r["score"] for r in rows) / len(rows),
            "by_length": {str(L): sum(r["exact"] for r in rows if r["length"] == L) / len(depths) for L in lengths},
        }
    model.train()
    return summary, results


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------

def write_card(path: Path, name: str, info: dict):
    a = info["arch"]
    ev = info.get("eval_summary") or {}
    lines = [
        f"# {name}", "",
        "Small Llama-architecture demo model trained from scratch by `tools/train_demo_model.py` for duo "
        "(DuoAttention engine). It is meant to really retrieve information from far back in a 16K-token "
        "context, so that retrieval vs streaming heads matter. It is NOT a useful language model.", "",
        "## Architecture", "",
        "| field | value |", "|---|---|",
        f"| layers | {a['num_hidden_layers']} |", f"| hidden | {a['hidden_size']} |",
        f"| query heads | {a['num_attention_heads']} |", f"| KV heads | {a['num_key_value_heads']} "
        f"({a['num_key_value_heads'] * a['num_hidden_layers']} in total) |",
        f"| head_dim | {a.get('head_dim', a['hidden_size'] // a['num_attention_heads'])} |",
        f"| intermediate (SwiGLU) | {a['intermediate_size']} |", f"| vocab | {a['vocab_size']} |",
        f"| rope_theta | {info['rope_theta']} |", f"| max_position_embeddings | {info['max_position']} |",
        "| tied embeddings | yes |", f"| parameters | {info['params']:,} |",
        f"| model.safetensors (bf16) | {info['size_mb']:.2f} MB |", "",
        "## Training", "",
        f"- Card: {info['device_name']}; wall time of training {info['train_time_s']:.0f} s, "
        f"{info['steps']} steps, {info['tokens']:,} tokens; final LM loss (non-answer tokens) {info['final_loss']:.4f}, "
        f"answer-token loss {info['final_answer_loss']:.4f}.",
        f"- Seed {info['config']['seed']}; AdamW (fused) lr {info['config']['lr']} betas (0.9, 0.95) wd 0.1, "
        f"warm-up {info['config']['warmup']} steps then cosine to 10% over the time budget; bf16 autocast; "
        f"~{info['config']['batch_tokens']:,} tokens per step; SDPA attention; no dropout.",
        *([f"- Includes an --extra-time continuation of {info['config']['extra_time']:.0f} s (final length mix, "
            f"LR x {info['config']['extra_lr_scale']}); steps, tokens and time above are cumulative."]
          if info['config'].get('extra_time') else []),
        "- Curriculum of sequence lengths by training progress: 1K -> 2K -> 4K -> 8K, then a mix of "
        "16,640 (55%), 8K, 4K, 2K tokens.",
        "- Data: public-domain text from the duo corpus (gutenberg, inaugural, state_union) as haystacks, "
        "25% of documents use the classic passkey filler instead; every document contains synthetic "
        "retrieval tasks (numeric passkeys, NATO-word passkeys, key-value lookups, sentence needles; see "
        "docs/demo_models.md and tools/make_needle_data.py) at random token depths, with the questions "
        "and answers at the end. 35% of documents hold one needle and one question (like the eval), the "
        "rest several needles and questions; about 45% of the needles are sentence needles whose slots are "
        "random runs of training-corpus words, random corpus words and random proper nouns (so that only "
        "copying the needle answers the question), in six wordings.",
        f"- Loss: mean next-token cross-entropy over all non-answer tokens (haystack, needles, questions) "
        f"+ {info['config']['answer_weight']} x mean cross-entropy over the answer tokens (\" answer\\n\"), so the "
        "retrieval signal keeps its weight at every sequence length.",
        f"- Held out (never trained on, used for evaluation haystacks): gutenberg "
        f"{', '.join(HELDOUT_GUTENBERG)}; state_union addresses from {HELDOUT_STATE_UNION_FROM} on.", "",
        "## Prompt format", "",
        "```",
        "<|begin_of_text|>{haystack[:d]}\\n{needle}\\n{haystack[d:]}\\n\\nQuestion: {question}\\nAnswer:",
        "```",
        "The model then generates ` {answer}\\n`. The needle is inserted at a token position d of the "
        "tokenized haystack; the three pieces (haystack, \"\\n\" + needle + \"\\n\", question block) are "
        "tokenized separately and concatenated. Example (passkey):", "",
        "```",
        "...The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
        "The pass key is 58213. Remember it. 58213 is the pass key.",
        "The grass is green. ...",
        "",
        "Question: What is the pass key?",
        "Answer: 58213",
        "```", "",
        "## Built-in evaluation (PyTorch, greedy, held-out text)", "",
    ]
    if ev:
        lengths = list(next(iter(ev.values()))["by_length"].keys())
        lines.append("| task | " + " | ".join(lengths) + " | exact (all) | word score |")
        lines.append("|---" * (len(lengths) + 3) + "|")
        for k, v in ev.items():
            lines.append(f"| {k} | " + " | ".join(f"{v['by_length'][L]:.2f}" for L in lengths) +
                         f" | {v['exact']:.3f} | {v['score']:.3f} |")
        lines += ["", f"Depths: {info['eval_depths']}. passkey = 5-digit number with the first wording, "
                  "sentence = the classic San Francisco needle (never seen in training), exact match of the "
                  "first generated line. Columns are prompt lengths in tokens."]
    lines += ["", "## Evaluation in duo (C++)", "", "(to be added)", ""]
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Training one model
# ----------------------------------------------------------------------------------------------

def train_one(kind: str, args, tok, hf_tok, train_builder_state, builder, held_builder, out_root: Path):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    name = f"duo-demo-{kind}" + ("-tiny" if args.tiny else "")
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    log_path, ckpt_path = out / "train_log.json", out / "ckpt.pt"
    done_before = log_path.exists() and json.loads(log_path.read_text()).get("done", False)
    extra = args.extra_time > 0 and done_before
    if done_before and args.resume and not extra:
        log(f"{name}: already done, skipping")
        return "done"
    if extra and not ckpt_path.exists():
        log(f"{name}: --extra-time needs {ckpt_path} (kept by default); skipping")
        return "done"
    if extra:
        args.resume = True
    device = args.device
    arch = dict((TINY_ARCHS if args.tiny else ARCHS)[kind])
    max_len = 1024 if args.tiny else 16640
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=max_len,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                      bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
                      attention_bias=False, mlp_bias=False, attention_dropout=0.0, initializer_range=0.02,
                      rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
                      **{"head_dim": arch["hidden_size"] // arch["num_attention_heads"], **arch})
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {arch} vocab={cfg.vocab_size} params={n_params:,} (~{2 * n_params / 1e6:.2f} MB bf16)")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"))
    step, train_time, tokens = 0, 0.0, 0
    phase, phase_step0, phase_t0, ck_budget = "main", 0, 0.0, None
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, train_time, tokens = ck["step"], ck["train_time"], ck["tokens"]
        phase, phase_step0, phase_t0 = ck.get("phase", "main"), ck.get("phase_step0", 0), ck.get("phase_t0", 0.0)
        ck_budget = ck.get("budget")
        if extra and ck.get("complete", False):
            # start a new extra phase: final length mix, lower peak LR, fresh warm-up and cosine
            phase, phase_step0, phase_t0, ck_budget = "extra", step, train_time, None
        random.setstate(ck["rng_py"])
        np.random.set_state(ck["rng_np"])
        torch.set_rng_state(ck["rng_torch"].cpu())
        if device.startswith("cuda") and ck.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ck["rng_cuda"].cpu())
        log(f"{name}: resumed at step {step}, train_time {train_time:.1f}s")

    def save_ckpt():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "train_time": train_time, "tokens": tokens, "budget": budget, "phase": phase,
                    "phase_step0": phase_step0, "phase_t0": phase_t0, "complete": complete, "rng_py": random.getstate(),
                    "rng_np": np.random.get_state(), "rng_torch": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state() if device.startswith("cuda") else None,
                    }, str(ckpt_path) + ".tmp")
        os.replace(str(ckpt_path) + ".tmp", ckpt_path)
        log(f"{name}: checkpoint saved at step {step}")

    budget, max_steps = (args.extra_time if phase == "extra" else args.time_budget), args.steps
    complete = False
    if args.wall_limit and budget:
        # shrink this model's training time so that all remaining models (+ save/eval) fit the wall limit
        left = args.wall_limit - (time.time() - T0) - args.eval_reserve * args._models_left
        budget = max(10.0, min(budget, left / args._models_left))
    if ck_budget is not None:
        budget = ck_budget
    log(f"{name}: training time budget {budget:.0f}s, max steps {max_steps or '-'}")

    def progress():
        ps = []
        if max_steps:
            ps.append((step - phase_step0) / max_steps)
        if budget:
            ps.append((train_time - phase_t0) / budget)
        return max(ps) if ps else 1.0

    batch_tokens = args.batch_tokens
    use_cuda = device.startswith("cuda")
    nworkers = args.workers
    pool = args._pool
    if pool is None:
        _worker_init(train_builder_state)
    pending = []  # (batch_idx, seq_len, future)
    next_submit = step

    def submit():
        nonlocal next_submit
        L = seq_len_for(1.0 if phase == "extra" else progress(), next_submit, args.seed, max_len, args.tiny)
        rows = max(1, batch_tokens // L)
        easy = phase == "main" and progress() < 0.1
        if pool is not None:
            pending.append((next_submit, L, pool.submit(make_batch, next_submit, L, rows, easy)))
        else:
            pending.append((next_submit, L, make_batch(next_submit, L, rows, easy)))
        next_submit += 1

    model.train()
    ema = ema_a = None
    last_ckpt = train_time
    last_log_t = time.time()
    log_tokens = 0
    loss_acc = torch.zeros((), device=device)
    aloss_acc = torch.zeros((), device=device)
    nacc = 0
    stop_reason = "done"
    t_last = time.time()
    first_batch = True
    while progress() < 1.0:
        if args.wall_limit and time.time() - T0 > args.wall_limit:
            stop_reason = "wall_limit"
            break
        while len(pending) < max(2, 2 * nworkers):
            submit()
        bidx, L, fut = pending.pop(0)
        toks, wts = fut.result() if pool is not None else fut
        if first_batch:  # do not count worker start-up as training time
            t_last, first_batch = time.time(), False
        x = torch.from_numpy(toks)
        w = torch.from_numpy(wts)
        if use_cuda:
            x = x.pin_memory().to(device, non_blocking=True)
            w = w.pin_memory().to(device, non_blocking=True)
        x = x.long()
        inp, tgt, wt = x[:, :-1], x[:, 1:], w[:, 1:]
        lr = lr_at(step - phase_step0, progress(), args.lr * (args.extra_lr_scale if phase == "extra" else 1.0),
                   args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type="cuda" if use_cuda else "cpu", dtype=torch.bfloat16, enabled=use_cuda):
            logits = model(input_ids=inp, use_cache=False).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             reduction="none").view_as(wt)
        am = (wt > 1.0).float()
        lm_loss = (ce * (1 - am)).sum() / (1 - am).sum().clamp(min=1)
        ans_loss = (ce * am).sum() / am.sum().clamp(min=1)
        loss = lm_loss + args.answer_weight * ans_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            loss_acc += lm_loss.detach()
            aloss_acc += ans_loss.detach()
            nacc += 1
        step += 1
        tokens += inp.numel()
        log_tokens += inp.numel()
        now = time.time()
        train_time += now - t_last
        t_last = now
        if step % args.log_every == 0 or progress() >= 1.0 or step <= 3:
            l, al = (loss_acc / nacc).item(), (aloss_acc / nacc).item()
            loss_acc.zero_()
            aloss_acc.zero_()
            nacc = 0
            ema = l if ema is None else 0.7 * ema + 0.3 * l
            ema_a = al if ema_a is None else 0.7 * ema_a + 0.3 * al
            dt = time.time() - last_log_t
            tps = log_tokens / max(dt, 1e-9)
            last_log_t, log_tokens = time.time(), 0
            p = progress()
            eta = (train_time / p - train_time) if p > 0 else float("nan")
            log(f"{name} step {step} L={L} rows={inp.shape[0]} lm_loss {l:.4f} ans_loss {al:.4f} lr {lr:.2e} "
                f"{tps / 1e3:.0f}K tok/s progress {100 * p:.1f}% ETA {eta:.0f}s")
        if args.ckpt_every and train_time - last_ckpt >= args.ckpt_every:
            save_ckpt()
            last_ckpt = train_time
            t_last = time.time()
    for _, _, f in pending:
        if pool is not None:
            f.cancel()
    if stop_reason != "done":
        save_ckpt()
        log(f"{name}: stopped ({stop_reason}) at step {step}; rerun with --resume to continue")
        return "incomplete"

    complete = True
    if args.keep_ckpt:
        save_ckpt()
    # ---- final save ----------------------------------------------------------------------------
    final_loss = ema if ema is not None else float("nan")
    final_aloss = ema_a if ema_a is not None else float("nan")
    save_model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    save_model.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    save_model.generation_config.bos_token_id = cfg.bos_token_id
    save_model.generation_config.eos_token_id = cfg.eos_token_id
    save_model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    log(f"{name}: saved to {out} (model.safetensors {size_mb:.2f} MB)")

    # ---- eval on held-out text, with the reloaded bf16 model ------------------------------------
    from transformers import AutoModelForCausalLM
    em = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16 if use_cuda else torch.float32,
                                              attn_implementation="sdpa").to(device)
    t_ev = time.time()
    try:
        summary, detail = run_eval(em, builder, held_builder, tok, args.eval_lengths, args.eval_depths, device,
                                   args.seed)
    except Exception as e:  # never lose a trained model to an eval problem
        import traceback
        traceback.print_exc()
        log(f"{name}: built-in eval FAILED: {e!r}")
        summary, detail = {}, {"error": repr(e)}
    log(f"{name}: eval ({time.time() - t_ev:.1f}s): " + json.dumps({k: (v['exact'], round(v['score'], 3)) for k, v in summary.items()}))
    for k, v in summary.items():
        log(f"   {k:16s} by length: {v['by_length']}")
    dev_name = torch.cuda.get_device_name() if use_cuda else "cpu"
    info = dict(done=True, name=name, arch={**arch, "vocab_size": cfg.vocab_size}, params=n_params,
                size_mb=size_mb, rope_theta=args.rope_theta, max_position=max_len, device_name=dev_name,
                steps=step, tokens=tokens, train_time_s=train_time, final_loss=final_loss,
                final_answer_loss=final_aloss, config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")},
                eval_lengths=args.eval_lengths, eval_depths=args.eval_depths,
                heldout={"gutenberg": HELDOUT_GUTENBERG, "state_union_from": HELDOUT_STATE_UNION_FROM},
                eval_summary=summary, eval_detail=detail)
    log_path.write_text(json.dumps(info, indent=1))
    write_card(out / "README.md", name, info)
    if args.pack:
        import tarfile
        args.pack.mkdir(parents=True, exist_ok=True)
        tar_path = args.pack / f"{name}.tar"
        with tarfile.open(tar_path, "w") as tf:
            for f in sorted(out.iterdir()):
                if f.is_file() and not f.name.startswith("ckpt"):
                    tf.add(f, arcname=f"{name}/{f.name}")
        log(f"{name}: packed {tar_path} ({tar_path.stat().st_size / 2**20:.2f} MiB)")
    if ckpt_path.exists() and not args.keep_ckpt:
        ckpt_path.unlink()
    del model, em, opt
    if use_cuda:
        torch.cuda.empty_cache()
    return "done"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--model", choices=["mha", "gqa", "both"], default="both")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny smoke-test config (CPU, < 1 min)")
    ap.add_argument("--time-budget", type=float, default=210.0,
                    help="seconds of training per model (schedule is driven by it); 0 = off")
    ap.add_argument("--steps", type=int, default=0, help="max steps per model (0 = time budget only)")
    ap.add_argument("--wall-limit", type=float, default=0.0,
                    help="stop (with checkpoint) when the whole process has run this long; 0 = off")
    ap.add_argument("--eval-reserve", type=float, default=40.0,
                    help="seconds reserved per model for save + eval when --wall-limit shrinks budgets")
    ap.add_argument("--pack", type=Path, default=None,
                    help="also write <PACK>/<name>.tar of each finished model directory (without ckpt.pt)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch-tokens", type=int, default=131072)
    ap.add_argument("--answer-weight", type=float, default=1.0,
                    help="loss = mean CE(text tokens) + answer_weight * mean CE(answer tokens)")
    ap.add_argument("--rope-theta", type=float, default=250000.0)
    ap.add_argument("--vocab", type=int, default=6144)
    ap.add_argument("--workers", type=int, default=-1, help="data worker processes (-1: auto)")
    ap.add_argument("--ckpt-every", type=float, default=90.0, help="seconds of training between checkpoints")
    ap.add_argument("--keep-ckpt", action=argparse.BooleanOptionalAction, default=True,
                    help="keep models/<name>/ckpt.pt after finishing (needed for --extra-time); git-ignored")
    ap.add_argument("--extra-time", type=float, default=0.0,
                    help="continue FINISHED models for this many seconds (final length mix, LR x --extra-lr-scale, "
                         "new warm-up + cosine), then save and evaluate again")
    ap.add_argument("--extra-lr-scale", type=float, default=0.3)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-lengths", type=int, nargs="+", default=None)
    ap.add_argument("--eval-depths", type=float, nargs="+", default=None)
    args = ap.parse_args()

    if args.tiny:
        args.vocab = min(args.vocab, 4096)
        if args.batch_tokens == 131072:
            args.batch_tokens = 2048
        if not args.steps and args.time_budget == 210.0:
            args.steps, args.time_budget = 30, 0
        args.warmup = min(args.warmup, 5)
        args.log_every = min(args.log_every, 5)
        args.eval_lengths = args.eval_lengths or [256, 512, 1024]
        args.eval_depths = args.eval_depths or [0.0, 0.5, 1.0]
    else:
        args.eval_lengths = args.eval_lengths or [1024, 2048, 4096, 8192, 16384]
        args.eval_depths = args.eval_depths or [round(i / 9, 4) for i in range(10)]
    if args.workers < 0:
        args.workers = 0 if args.tiny else max(1, min(8, (os.cpu_count() or 2) - 4))

    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.device.startswith("cuda"):
        assert torch.cuda.is_available(), "CUDA not available (use --device cpu)"
        log(f"device: {torch.cuda.get_device_name()}")
    random.seed(args.seed)
    np.random.seed(args.seed)

    train_files, held_files = list_corpus(args.corpus)
    log(f"corpus: {len(train_files)} training files, {len(held_files)} held-out files")
    # sentence-needle slot contents come from the training works only
    slot_text = "\n".join(read_text(p) for p in train_files)
    slots = nd.SlotSource(slot_text)
    args.out.mkdir(parents=True, exist_ok=True)
    tok_dir = args.out / ("_tokenizer-tiny" if args.tiny else "_tokenizer")
    from tokenizers import Tokenizer
    if (args.resume or args.extra_time > 0) and (tok_dir / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        log(f"tokenizer: reused {tok_dir}")
    else:
        t = time.time()
        tok = train_tokenizer(train_files, args.vocab, 2_000_000 if args.tiny else None, slots)
        tok_dir.mkdir(parents=True, exist_ok=True)
        tok.save(str(tok_dir / "tokenizer.json"))
        log(f"tokenizer: trained vocab {tok.get_vocab_size()} in {time.time() - t:.1f}s")
    hf_tok = wrap_fast(tok)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)

    t = time.time()
    train_texts = encode_files(tok, train_files)
    held_texts = encode_files(tok, held_files)
    filler = np.asarray(tok.encode(nd.FILLER, add_special_tokens=False).ids, np.int32)
    log(f"corpus tokenized in {time.time() - t:.1f}s: train {sum(map(len, train_texts)):,} tokens, "
        f"held-out {sum(map(len, held_texts)):,} tokens; {sum(map(len, train_texts)) and sum(len(read_text(p)) for p in train_files) / sum(map(len, train_texts)):.2f} chars/token")
    builder = DocBuilder(tok, train_texts, filler, bos, eos)
    held_builder = DocBuilder(tok, held_texts, filler, bos, eos)
    state = dict(tok=tok.to_str(), texts=train_texts, filler=filler, bos=bos, eos=eos,
                 answer_weight=args.answer_weight, seed=args.seed, slot_text=slot_text)

    resume_flag = args.resume
    args._pool = None
    if args.workers > 0:
        import multiprocessing as mp
        args._pool = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"),
                                         initializer=_worker_init, initargs=(state,))
    kinds = ["mha", "gqa"] if args.model == "both" else [args.model]
    status = {}
    for i, k in enumerate(kinds):
        args._models_left = len(kinds) - i
        status[k] = train_one(k, args, tok, hf_tok, state, builder, held_builder, args.out)
        args.resume = resume_flag
        if status[k] == "incomplete":
            break
    log(f"all done: {status} total wall {time.time() - T0:.1f}s")
    if any(v == "incomplete" for v in status.values()):
        sys.exit(3)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Dev-time measurement: one optimizer step of SmolLM2-135M in plain PyTorch doing the
computation TRL's trainers perform, on synthetic rows of the shape `candor bench train` uses
(first half prompt, second half completion), CPU, eager attention.

- dpo: policy forward+backward on chosen and rejected rows concatenated, reference forward
  under no_grad, sigmoid DPO loss (beta 0.1), grad clipping at 1.0, AdamW (DPOTrainer).
- sft: mean cross-entropy over completion tokens, clipping, AdamW (SFTTrainer with
  completion-only loss).
- --bf16: bf16 autocast around the forward passes (TRL's `bf16=True`).
- --gradient-checkpointing: transformers' per-layer checkpointing (TRL's default in recent
  versions).

    cargo run --release -- export --checkpoint default --output /tmp/smollm2-hf
    python scripts/bench_pytorch.py /tmp/smollm2-hf --objective dpo --batch-size 4 --seq-len 256
"""
import argparse
import contextlib
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--objective", choices=["dpo", "sft"], default="dpo")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs (dpo) or sequences (sft)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    load = lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    policy = load()
    policy.train()
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = load().eval() if args.objective == "dpo" else None
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    rows = 2 * args.batch_size if args.objective == "dpo" else args.batch_size
    seq = args.seq_len
    ids = torch.randint(0, policy.config.vocab_size, (rows, seq))
    mask = torch.zeros(rows, seq - 1)
    mask[:, seq // 2 - 1:] = 1.0
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def token_logps(model):
        with autocast():
            logits = model(ids).logits[:, :-1]
        return torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None])[..., 0]

    times, losses = [], []
    for step in range(args.steps + 1):
        start = time.time()
        lp = token_logps(policy)
        if args.objective == "dpo":
            pi = (lp * mask).sum(-1)
            with torch.no_grad():
                ref = (token_logps(reference) * mask).sum(-1)
            b = args.batch_size
            h = (pi[:b] - ref[:b]) - (pi[b:] - ref[b:])
            loss = -F.logsigmoid(0.1 * h).mean()
        else:
            loss = -(lp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step > 0:
            times.append(time.time() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    flags = (" bf16" if args.bf16 else " f32") + (" +gradient-checkpointing" if args.gradient_checkpointing else "")
    print(f"pytorch {args.objective} {args.batch_size} x {seq}{flags}: {statistics.median(times):.2f} s/step "
          f"(median of {len(times)}), peak RSS {peak / 1e9:.2f} GB, losses {[round(l, 4) for l in losses]}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()

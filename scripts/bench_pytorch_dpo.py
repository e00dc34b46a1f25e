#!/usr/bin/env python3
"""Dev-time measurement: one DPO optimizer step of SmolLM2-135M in plain PyTorch, the same
computation TRL's DPOTrainer performs (policy forward+backward on chosen and rejected rows
concatenated, reference forward under no_grad, sigmoid DPO loss, AdamW), on synthetic data
of the shape `candor bench train` uses. f32, eager attention, CPU.

    cargo run --release -- export --checkpoint default --output /tmp/smollm2-hf
    /tmp/ref/bin/python scripts/bench_pytorch_dpo.py /tmp/smollm2-hf [pairs] [seq_len] [steps]
"""
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def main():
    path = sys.argv[1]
    pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    seq = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    ids = torch.randint(0, policy.config.vocab_size, (2 * pairs, seq))
    mask = torch.zeros(2 * pairs, seq - 1)
    mask[:, seq // 2 - 1:] = 1.0

    def seq_logps(model):
        logits = model(ids).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0]
        return (lp * mask).sum(-1)

    times = []
    for step in range(steps + 1):
        start = time.time()
        pi = seq_logps(policy)
        with torch.no_grad():
            ref = seq_logps(reference)
        h = (pi[:pairs] - ref[:pairs]) - (pi[pairs:] - ref[pairs:])
        loss = -F.logsigmoid(0.1 * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step > 0:
            times.append(time.time() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"pytorch dpo {pairs} x {seq}: {statistics.median(times):.2f} s/step (median of {len(times)}), "
          f"peak RSS {peak / 1e9:.2f} GB, torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()

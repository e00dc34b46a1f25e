#!/usr/bin/env python3
"""Dev-time measurement: one DPO optimizer step with PEFT LoRA over a frozen f32 base in plain
PyTorch + transformers + PEFT, doing what TRL's DPOTrainer does with a `peft_config`, on random
weights of a published shape (`configs/shapes/NAME.json`, the same file `candor bench train
--shape NAME` reads), CPU, eager attention:

- LoRA r/alpha on every projection (q/k/v/o/gate/up/down), dropout 0, PEFT's initialisation;
- policy forward+backward on chosen and rejected rows concatenated (adapters on), reference
  forward under no_grad with the adapters disabled (`model.disable_adapter()`, as TRL does when
  no ref_model is given), sigmoid DPO loss (beta 0.1), grad clipping at 1.0, AdamW over the
  adapters;
- synthetic rows of exactly `--seq-len` random tokens (first half prompt, second half
  completion), as `candor bench train` builds them.

    python scripts/bench_pytorch_lora.py configs/shapes/qwen2.5-1.5b.json --batch-size 4 --seq-len 256
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", help="a config.json of configs/shapes/")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    with open(args.shape) as f:
        raw = json.load(f)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config._attn_implementation = "eager"
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                            target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    rows, seq = 2 * args.batch_size, args.seq_len
    ids = torch.randint(0, config.vocab_size, (rows, seq))
    mask = torch.zeros(rows, seq - 1)
    mask[:, seq // 2 - 1:] = 1.0

    def summed_logps(m):
        logits = m(ids).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None])[..., 0]
        return (lp * mask).sum(-1)

    times, losses = [], []
    for step in range(args.steps + 1):
        start = time.time()
        pi = summed_logps(model)
        with torch.no_grad(), model.disable_adapter():
            ref = summed_logps(model)
        b = args.batch_size
        h = (pi[:b] - ref[:b]) - (pi[b:] - ref[b:])
        loss = -F.logsigmoid(0.1 * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step > 0:
            times.append(time.time() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"pytorch+peft dpo lora r{args.lora_r} {args.shape} {args.batch_size} x {seq} f32 base"
          f"{' +gradient-checkpointing' if args.gradient_checkpointing else ''}: "
          f"{statistics.median(times):.2f} s/step (median of {len(times)}), peak RSS {peak / 1e9:.2f} GB, "
          f"losses {[round(l, 4) for l in losses]}, torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()

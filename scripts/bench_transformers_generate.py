#!/usr/bin/env python3
"""Dev-time measurement: transformers' greedy `generate` on the prompts and lengths of
`candor bench generate` (chat template, 64 new tokens, no stop), batch 1 and batch 8, f32, CPU.

    python scripts/bench_transformers_generate.py /tmp/smollm2-hf
"""
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "Explain why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 12 times 7?",
    "Describe a cat to someone who has never seen one.",
    "Give me a tip for learning a language.",
    "Summarize the plot of Cinderella.",
]


def main():
    path = sys.argv[1]
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    for batch in (1, 8):
        enc = tok(texts[:batch], return_tensors="pt", padding=True)
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=4, do_sample=False)
            start = time.time()
            out = model.generate(**enc, **kwargs)
        secs = time.time() - start
        tokens = (out.shape[1] - enc["input_ids"].shape[1]) * batch
        print(f"transformers generate batch {batch}: {tokens / secs:.1f} tokens/s with prefill, "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()

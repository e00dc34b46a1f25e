#!/usr/bin/env python3
"""Dev-time check: a directory candor exported loads in transformers unchanged, and
transformers' summed completion log-probs equal `candor logprobs` on the same rows.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers safetensors
    cargo build --release
    /tmp/ref/bin/python scripts/check_export_transformers.py runs/dpo/final [target/release/candor]

Python is only the reference here; candor never needs it at run time.
"""
import json
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROWS = [
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": [{"role": "user", "content": "What is 2 + 3? Answer with just the number."}],
     "completion": [{"role": "assistant", "content": "5"}]},
]


def transformers_logps(model, tok, row):
    if isinstance(row["prompt"], str):
        prompt_ids = tok(row["prompt"])["input_ids"]
        full = tok(row["prompt"] + row["completion"])["input_ids"] + [tok.eos_token_id]
    else:
        # TRL's rule: render with the template, tokenize without special tokens.
        prompt_text = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        full_text = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        full = tok(full_text, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
        n += 1
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[n - 1:].sum().item(), len(full) - n


def main():
    model_dir = sys.argv[1]
    candor = sys.argv[2] if len(sys.argv) > 2 else "target/release/candor"
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for r in ROWS:
            f.write(json.dumps(r) + "\n")
    out = subprocess.run([candor, "logprobs", "--model", model_dir, "--data", f.name], check=True,
                         capture_output=True, text=True).stdout
    worst = 0.0
    for row, line in zip(ROWS, out.splitlines()):
        ours = json.loads(line)
        ref, n = transformers_logps(model, tok, row)
        diff = abs(ours["completion_logps"] - ref)
        worst = max(worst, diff / max(abs(ref), 1e-6))
        print(f"tokens {ours['completion_tokens']} vs {n}; candor {ours['completion_logps']:.6f} transformers {ref:.6f}")
        assert ours["completion_tokens"] == n
    print(f"largest relative difference: {worst:.2e}")
    assert worst < 1e-4


if __name__ == "__main__":
    main()

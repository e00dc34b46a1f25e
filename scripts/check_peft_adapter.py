#!/usr/bin/env python3
"""Dev-time check: a LoRA adapter candor saved loads with PEFT onto its base model, and the
logits equal candor's (base + adapter).

    /tmp/ref/bin/pip install torch transformers peft
    /tmp/ref/bin/python scripts/check_peft_adapter.py RUN/checkpoints/step-N [target/release/candor]

`base_model_name_or_path` in the adapter must be a transformers directory.
"""
import json
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    adapter = sys.argv[1]
    candor = sys.argv[2] if len(sys.argv) > 2 else "target/release/candor"
    base_dir = json.load(open(f"{adapter}/adapter_config.json"))["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter).eval()
    row = {"prompt": "Question: What color is the sky?\nAnswer:", "completion": " Blue."}
    with open("/tmp/peft-check.jsonl", "w") as f:
        f.write(json.dumps(row) + "\n")
    ours = json.loads(subprocess.run([candor, "logprobs", "--model", adapter, "--data", "/tmp/peft-check.jsonl"],
                                     check=True, capture_output=True, text=True).stdout)
    tok_out = subprocess.run([candor, "logprobs", "--model", base_dir, "--data", "/tmp/peft-check.jsonl"],
                             check=True, capture_output=True, text=True).stdout
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_dir)
    p = tok(row["prompt"])["input_ids"]
    full = tok(row["prompt"] + row["completion"])["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([full])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    ref = lp[len(p) - 1:].sum().item()
    base_lp = json.loads(tok_out)["completion_logps"]
    print(f"candor base+adapter {ours['completion_logps']:.6f}, PEFT {ref:.6f}, base alone {base_lp:.6f}")
    assert abs(ours["completion_logps"] - ref) < 1e-4 * max(1.0, abs(ref))
    assert abs(base_lp - ref) > 1e-3, "the adapter should change the model"


if __name__ == "__main__":
    main()

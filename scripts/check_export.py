#!/usr/bin/env python3
"""Dev-time check that a `candor export` of a tiny fixture model loads in transformers with the
fixture's logits and token log-probs. Python is never needed at runtime.

    cargo run -- export --checkpoint tests/fixtures/qwen3-tiny/model.gguf -o /tmp/exp-qwen3
    cargo run -- export --checkpoint tests/fixtures/phi3-tiny/model.gguf -o /tmp/exp-phi3
    /work/venv/bin/python scripts/check_export.py qwen3-tiny:/tmp/exp-qwen3 phi3-tiny:/tmp/exp-phi3

Measured (torch 2.15, transformers 5.23): both load as Qwen3ForCausalLM / Phi3ForCausalLM
(Phi-3's fused qkv_proj and gate_up_proj rebuilt on export) with logits identical to the
fixture's (max difference 0.0) and token log-probs within 4e-7.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
for pair in sys.argv[1:]:
    fixture, exported = pair.split(":", 1)
    e = json.load(open(f"tests/fixtures/{fixture}/expected.json"))
    model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager", dtype=torch.float32)
    ids, mask = torch.tensor(e["input_ids"]), torch.tensor(e["attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    lp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    logit_diff = (logits - torch.tensor(e["logits"])).abs().max().item()
    logp_diff = (lp - torch.tensor(e["token_logps"], dtype=torch.float64)).abs().max().item()
    print(f"{fixture}: {type(model).__name__}, max |logit diff| {logit_diff:.3g}, max |token logp diff| {logp_diff:.3g}")
    assert logit_diff < 1e-4 and logp_diff < 1e-5

#!/usr/bin/env python3
"""Dev-time check that `candor export` of Gemma 3 270M loads in transformers as
Gemma3ForCausalLM, with the tokenizer and the numbers transformers gets from the GGUF itself
(`tests/fixtures/gemma3/reference.json`). Python is never needed at runtime.

    cargo run -- export --checkpoint gemma3-270m --chat-template templates/gemma3.jinja -o /tmp/gemma3-hf
    /work/venv/bin/python scripts/check_export_gemma3.py /tmp/gemma3-hf
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
ref = json.load(open("tests/fixtures/gemma3/reference.json"))
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager", dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(type(model).__name__, type(tok).__name__)
for case in ref["tokenization"]:
    assert tok(case["text"])["input_ids"] == case["ids_with_special"], case["name"]
    assert tok.decode(case["ids_without_special"]) == case["decoded_without_special"], case["name"]
print(f"tokenizer: {len(ref['tokenization'])} texts, identical ids and decodings")
messages = [{"role": "user", "content": "What is 2 + 3? Answer with one number."}]
chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
assert tok(chat, add_special_tokens=False)["input_ids"] == ref["prompts"][1]["prompt_ids"], chat
print("chat template: the reference prompt's ids")
worst_logit, worst_rel = 0.0, 0.0
for p in ref["prompts"]:
    ids = torch.tensor([p["input_ids"]])
    with torch.no_grad():
        last = model(torch.tensor([p["prompt_ids"]])).logits[0, -1]
        logits = model(ids).logits[0].double()
    worst_logit = max(worst_logit, (last[:16] - torch.tensor(p["last_logits_first16"])).abs().max().item())
    n = p["prompt_len"]
    lp = torch.log_softmax(logits, -1)[n - 1 : -1].gather(-1, ids[0, n:, None])[:, 0]
    worst_rel = max(worst_rel, abs(lp.sum().item() - p["sum_logps"]) / abs(p["sum_logps"]))
print(f"max |last logit diff| {worst_logit:.3g}, max relative summed-logp diff {worst_rel:.3g}")
assert worst_logit < 1e-4 and worst_rel < 1e-5

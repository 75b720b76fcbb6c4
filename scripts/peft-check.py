"""Checks an adapter trained by peftbench in Python PEFT: the same texts scored by
`peftbench score` and by transformers + PEFT (`PeftModel.from_pretrained`) must give the same
logits; with --merged, the directory `peftbench merge` wrote must too, loaded by transformers
alone. Prints the largest absolute difference of each and exits 1 above --tol.

    ~/.cache/torch-venv/bin/python scripts/peft-check.py --peftbench target/release/peftbench \\
        --model ~/.cache/peftbench/all-MiniLM-L6-v2 --adapter results/S/runs/adapters/RUN \\
        [--merged DIR] [--text "..."]...

Optional: tests do not need Python. Needs torch, transformers < 4.57 and peft 0.21.2.
"""

import argparse
import json
import subprocess
import sys

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

TEXTS = [
    "a gripping, beautifully acted film",
    "the plot is thin and the jokes fall flat",
    "it is neither good nor bad, just long",
]


def ours(binary, model, adapter, texts):
    cmd = [binary, "score", "--model", model]
    if adapter:
        cmd += ["--adapter", adapter]
    for t in texts:
        cmd += ["--text", t]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def batch(rows):
    n = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return ids, mask


def logits_of(model, ids, mask, seq_cls):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    if seq_cls:
        return out
    last = mask.sum(1) - 1
    return out[torch.arange(out.shape[0]), last]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peftbench", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--merged")
    ap.add_argument("--text", action="append")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    texts = a.text or TEXTS
    mine = ours(a.peftbench, a.model, a.adapter, texts)
    ids, mask = batch(mine["input_ids"])
    want = torch.tensor(mine["logits"])
    cfg = PeftConfig.from_pretrained(a.adapter)
    seq_cls = cfg.task_type == "SEQ_CLS"
    if seq_cls:
        base = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=want.shape[1])
    else:
        base = AutoModelForCausalLM.from_pretrained(a.model)
    peft_model = PeftModel.from_pretrained(base, a.adapter).eval()
    worst = 0.0
    d = (logits_of(peft_model, ids, mask, seq_cls) - want).abs().max().item()
    print(f"{cfg.peft_type} {a.adapter}: peftbench vs PEFT max abs logit difference {d:.2e}")
    worst = max(worst, d)
    if a.merged:
        cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
        merged = cls.from_pretrained(a.merged).eval()
        d = (logits_of(merged, ids, mask, seq_cls) - want).abs().max().item()
        print(f"merged {a.merged} in transformers vs peftbench: max abs logit difference {d:.2e}")
        worst = max(worst, d)
    sys.exit(0 if worst <= a.tol else 1)


if __name__ == "__main__":
    main()

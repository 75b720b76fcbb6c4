"""Makes the PEFT parity fixtures under tests/fixtures/peft/ (committed; tests need no Python).

For each case: a base model (all-MiniLM-L6-v2 with a 2-class head, or a tiny GPT-2 / Llama with
random weights, written beside the fixtures), a PEFT adapter trained a few steps on random data
so that no factor is still at its initial value, saved with `save_pretrained`, then reloaded
the way a user would (`PeftModel.from_pretrained`, inference mode) to score fixed inputs.
Each case folder holds the adapter as PEFT saved it, `inputs.json` and `expected.safetensors`
(the reloaded model's logits, and its logits before saving).

    ~/.cache/torch-venv/bin/python scripts/peft-fixtures.py [--minilm DIR] [--out DIR] [--only NAME ...]

Needs torch, transformers < 4.57 and peft 0.21.2 (the README's recipe).
"""

import argparse
import json
import os
import shutil

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    VeraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
)

SEQ = 8


def inputs(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, SEQ - 3 :] = 0  # the second row is padded
    ids[1, SEQ - 3 :] = 0
    return ids, mask


def train(model, ids, mask, labels, steps, lr, causal, allocate=False):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        if causal:
            out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        else:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        if allocate:
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()


ONLY = None


def case(out, name, make_base, config, vocab, causal, steps=4, lr=2e-2, allocate=False):
    if ONLY and name not in ONLY:
        return
    torch.manual_seed(0)
    model = get_peft_model(make_base(), config)
    ids, mask = inputs(vocab, seed=len(name))
    labels = torch.tensor([0, 1])
    train(model, ids, mask, labels, steps, lr, causal, allocate)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    torch.manual_seed(1)  # the reloaded base's fresh head must not matter: it is in the adapter
    reloaded = PeftModel.from_pretrained(make_base(), d)
    reloaded.eval()
    with torch.no_grad():
        logits = reloaded(input_ids=ids, attention_mask=mask).logits
    # README.md and other files save_pretrained writes are not part of the fixture.
    for f in os.listdir(d):
        if f not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(d, f))
    with open(os.path.join(d, "inputs.json"), "w") as f:
        json.dump({"input_ids": ids.tolist(), "attention_mask": mask.tolist()}, f)
    save_file(
        {"logits": logits.float().contiguous(), "logits_before_save": before.float().contiguous()},
        os.path.join(d, "expected.safetensors"),
    )
    drift = (logits - before).abs().max().item()
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"{name}: logits {tuple(logits.shape)}, reload vs before save {drift:.2e}, {size} bytes")


def tiny_base(out, name, config, cls):
    d = os.path.join(out, name)
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        torch.manual_seed(42)
        cls.from_config(config).save_pretrained(d)
    return lambda: cls.from_pretrained(d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", default=os.path.expanduser("~/.cache/peftbench/all-MiniLM-L6-v2"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "peft"))
    ap.add_argument("--only", nargs="*", help="make only these cases")
    a = ap.parse_args()
    global ONLY
    ONLY = a.only
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(2)

    def minilm():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(a.minilm, num_labels=2)

    seq = TaskType.SEQ_CLS
    v = 30522
    case(out, "minilm-lora", minilm, LoraConfig(task_type=seq, r=4, lora_alpha=8, target_modules=["query", "value"]), v, False)
    case(
        out,
        "minilm-rslora",
        minilm,
        LoraConfig(
            task_type=seq,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense"],
            rank_pattern={"value": 2},
            alpha_pattern={"intermediate.dense": 4},
        ),
        v,
        False,
    )
    case(
        out,
        "minilm-adalora",
        minilm,
        AdaLoraConfig(
            task_type=seq, init_r=6, target_r=3, tinit=2, tfinal=2, deltaT=1, total_step=10, lora_alpha=8,
            target_modules=["query", "value"],
        ),
        v,
        False,
        steps=10,
        allocate=True,
    )
    case(out, "minilm-prefix", minilm, PrefixTuningConfig(task_type=seq, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16), v, False)
    case(out, "minilm-prefix-noproj", minilm, PrefixTuningConfig(task_type=seq, num_virtual_tokens=4), v, False)
    case(out, "minilm-prompt", minilm, PromptTuningConfig(task_type=seq, num_virtual_tokens=5), v, False)
    case(out, "minilm-ptuning-mlp", minilm, PromptEncoderConfig(task_type=seq, num_virtual_tokens=4, encoder_hidden_size=16), v, False)
    case(
        out,
        "minilm-ptuning-lstm",
        minilm,
        PromptEncoderConfig(task_type=seq, num_virtual_tokens=4, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
        v,
        False,
    )
    case(out, "minilm-dora", minilm, LoraConfig(task_type=seq, r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True), v, False)
    case(out, "minilm-vera", minilm, VeraConfig(task_type=seq, r=16, target_modules=["query", "value", "intermediate.dense"]), v, False, lr=5e-2)
    case(out, "minilm-loha", minilm, LoHaConfig(task_type=seq, r=4, alpha=8, target_modules=["query", "value"]), v, False)
    # decompose_both with r = 4: both Kronecker factors of every 384-wide projection (16 x 24) decomposed.
    case(out, "minilm-lokr", minilm, LoKrConfig(task_type=seq, r=4, alpha=8, target_modules=["query", "value"], decompose_both=True), v, False)
    # Initial factors only (no step): PiSSA's and OLoRA's A and B from W, to compare up to sign.
    case(out, "minilm-pissa-init", minilm, LoraConfig(task_type=seq, r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="pissa"), v, False, steps=0)
    case(out, "minilm-olora-init", minilm, LoraConfig(task_type=seq, r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="olora"), v, False, steps=0)
    case(out, "minilm-ln-tuning", minilm, LNTuningConfig(task_type=seq, target_modules=["LayerNorm"]), v, False)
    # PEFT's BERT default: key, value and `output.dense` (which also matches attention.output.dense),
    # the dense ones scaled on their input.
    case(out, "minilm-ia3", minilm, IA3Config(task_type=seq), v, False, lr=5e-2)

    gpt2 = tiny_base(out, "tiny-gpt2", GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64), AutoModelForCausalLM)
    case(out, "tiny-gpt2-lora", gpt2, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True), 96, True)
    llama = tiny_base(
        out,
        "tiny-llama",
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        ),
        AutoModelForCausalLM,
    )
    case(out, "tiny-llama-lora", llama, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 96, True)
    case(out, "tiny-llama-dora", llama, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), 96, True)
    case(out, "tiny-llama-vera", llama, VeraConfig(task_type=TaskType.CAUSAL_LM, r=8, target_modules=["q_proj", "v_proj", "down_proj"]), 96, True, lr=5e-2)
    case(out, "tiny-llama-loha", llama, LoHaConfig(task_type=TaskType.CAUSAL_LM, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 96, True)
    case(out, "tiny-llama-lokr", llama, LoKrConfig(task_type=TaskType.CAUSAL_LM, r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]), 96, True)
    case(out, "tiny-llama-ia3", llama, IA3Config(task_type=TaskType.CAUSAL_LM), 96, True, lr=5e-2)
    case(out, "tiny-llama-ln-tuning", llama, LNTuningConfig(task_type=TaskType.CAUSAL_LM), 96, True)


if __name__ == "__main__":
    main()

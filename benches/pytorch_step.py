"""PyTorch + PEFT training step on the same configurations as `benches/step_table.rs`.

all-MiniLM-L6-v2 with a 2-class head (AutoModelForSequenceClassification), batch 16 x 64 of
random token ids, fp32, AdamW (or, with --random-config, a random model of that config's
shape; --device cuda, --dtype bf16 with the adapters kept in f32 as PEFT's autocast does,
--batch and --seq as the step table is run); per method: 3 warm-up steps, then 10 timed steps, methods
interleaved step by step (the host's speed drifts). Prints one JSON object
{method: [ms, ...]} on stdout.

The step table runs this between its own rounds when PEFTBENCH_PYTHON names a Python with
torch, transformers and peft installed (see README, "Benchmarks").

    python benches/pytorch_step.py --model ~/.cache/peftbench/all-MiniLM-L6-v2 --threads 2
"""

import argparse
import json
import sys
import time

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    TaskType,
    VeraConfig,
    get_peft_model,
)
from transformers import AutoConfig, AutoModelForSequenceClassification

SEQ_CLS = TaskType.SEQ_CLS


def configs(total_steps, llama=False):
    # The same shapes as peftbench's defaults (`peftbench methods`), with Llama's module names
    # where the model is one.
    qv = ["q_proj", "v_proj"] if llama else ["query", "value"]
    norms = ["input_layernorm", "post_attention_layernorm"] if llama else ["LayerNorm"]
    out = {
        "full_finetune": None,
        "lora": LoraConfig(task_type=SEQ_CLS, r=8, lora_alpha=16, target_modules=qv),
        "adalora": AdaLoraConfig(
            task_type=SEQ_CLS,
            init_r=12,
            target_r=8,
            lora_alpha=8,
            target_modules=qv,
            total_step=total_steps,
        ),
        "prefix_tuning": PrefixTuningConfig(
            task_type=SEQ_CLS, num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128
        ),
        # P-Tuning v2 is PEFT's prefix tuning without the reparametrisation.
        "p_tuning_v2": PrefixTuningConfig(task_type=SEQ_CLS, num_virtual_tokens=20),
        "prompt_tuning": PromptTuningConfig(task_type=SEQ_CLS, num_virtual_tokens=20),
        "p_tuning": PromptEncoderConfig(
            task_type=SEQ_CLS,
            num_virtual_tokens=20,
            encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP,
            encoder_hidden_size=128,
        ),
        "lora_plus": LoraConfig(task_type=SEQ_CLS, r=8, lora_alpha=16, target_modules=qv),
        "dora": LoraConfig(task_type=SEQ_CLS, r=8, lora_alpha=16, target_modules=qv, use_dora=True),
        "vera": VeraConfig(task_type=SEQ_CLS, r=256, target_modules=qv),
        "loha": LoHaConfig(task_type=SEQ_CLS, r=8, alpha=8, target_modules=qv),
        "lokr": LoKrConfig(task_type=SEQ_CLS, r=8, alpha=8, target_modules=qv),
        "ia3": IA3Config(task_type=SEQ_CLS),
        "ln_tuning": LNTuningConfig(task_type=SEQ_CLS, target_modules=norms),
        # PEFT has no BitFit: the plain model with only its biases (and the head) trainable.
        "bitfit": "bitfit",
    }
    if llama:
        # Llama has no biases: peftbench refuses BitFit there too.
        del out["bitfit"]
    return out


def build(name, cfg, base, dev, dtype):
    """The model with its method attached, and its optimizer."""
    # The frozen base in the run's dtype; PEFT keeps adapter weights in f32 (its
    # autocast_adapter_dtype), as peftbench keeps every trained parameter.
    model = base().to(device=dev, dtype=dtype)
    if cfg == "bitfit":
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias") and not n.startswith("bert.pooler"))
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    elif cfg is not None:
        model = get_peft_model(model, cfg)
    model.train()
    # Dropout off, as in peftbench's backbone, so both do the same arithmetic.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if name == "lora_plus":
        # LoRA+: B in a group of its own at 16x the rate (PEFT's create_loraplus_optimizer).
        b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
        opt = torch.optim.AdamW([{"params": rest, "lr": 1e-4}, {"params": b, "lr": 16e-4}])
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
    return (model, opt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", default="")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--memory", action="store_true", help="report each method's first-step resident memory (MB)")
    ap.add_argument("--random-config", default=None, help="config.json of a random model to use instead of --model's weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    ids = torch.randint(1000, 21000, (args.batch, args.seq), device=dev)
    mask = torch.ones_like(ids)
    labels = torch.arange(args.batch, device=dev) % 2
    hf_config = AutoConfig.from_pretrained(args.random_config) if args.random_config else None
    llama = hf_config is not None and hf_config.model_type == "llama"

    def base():
        if hf_config is None:
            return AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
        cfg = hf_config
        cfg.num_labels = 2
        cfg.pad_token_id = 0
        return AutoModelForSequenceClassification.from_config(cfg)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
    wanted = [m for m in args.methods.split(",") if m]
    setups = {}
    # A method this transformers/PEFT pair cannot build or step (transformers 5 dropped the
    # past_key_values PEFT's prefix tuning feeds BERT) is reported, not fatal to the others.
    errors = {}
    for name, cfg in configs(args.warmup + args.steps + 10, llama).items():
        if wanted and name not in wanted:
            continue
        try:
            setups[name] = build(name, cfg, base, dev, dtype)
        except Exception as e:  # noqa: BLE001 - any failure is reported per method
            errors[name] = f"{type(e).__name__}: {e}"[:300]


    def step(model, opt):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    # What each method's first step adds to resident memory (activations, gradients, AdamW
    # state): the kernel's high-water mark is reset before it (clear_refs 5) and read after.
    # The scaling bench runs this with a fixed MALLOC_MMAP_THRESHOLD_, so a freed tensor
    # leaves the resident set instead of staying in malloc's free lists for the next method.
    step_mb = {}

    def rss_kb(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    for name in list(setups):
        try:
            if args.memory:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                before = rss_kb("VmRSS")
                step(*setups[name])
                step_mb[name] = (rss_kb("VmHWM") - before) / 1e3
            for _ in range(args.warmup):
                step(*setups[name])
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"[:300]
            del setups[name]
    times = {name: [] for name in setups}
    for _ in range(args.steps):
        for name, (model, opt) in setups.items():
            t0 = time.perf_counter()
            step(model, opt)
            times[name].append((time.perf_counter() - t0) * 1e3)
    json.dump(
        {"torch": torch.__version__, "threads": torch.get_num_threads(), "ms": times, "step_mb": step_mb, "errors": errors},
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()

"""Makes tests/fixtures/gguf/smollm2.json (committed; tests need no Python): what transformers
makes of SmolLM2-135M-Instruct's Q4_1 GGUF file (scripts/fetch-smollm2.sh), loaded with
`gguf_file=` (transformers dequantizes every tensor to f32 through the `gguf` package).

- Token ids of a dozen strings, without special tokens added: transformers' GGUF converter
  prepends `<|im_start|>` as a BOS although the file says `tokenizer.ggml.add_bos_token =
  false`, so the comparison leaves it out.
- The last-position logits of three prompts (f32): the top 64 and 512 ids drawn at random,
  with their values, and the argmax.

    ~/.cache/torch-venv/bin/python scripts/gguf-fixtures.py [--gguf FILE] [--out FILE]

Needs torch, transformers < 4.57 and gguf (`pip install gguf`).
"""

import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "12345 apples cost $6.78, or 9 1/2 pounds",
    "  leading and   inner   spaces\tand a tab",
    "line one\nline two\n\nline four",
    "naïve café, Ünïcödé and 東京 (Tokyo) 🙂",
    "don't, can't, we'll, they're, I'd",
    "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "URL: https://example.com/a?b=c&d=e",
    "e = mc^2; π ≈ 3.14159",
]

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4,",
]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser()
    p.add_argument(
        "--gguf",
        default=os.path.expanduser("~/.cache/peftbench/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    p.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "gguf", "smollm2.json"))
    a = p.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    d, f = os.path.dirname(a.gguf), os.path.basename(a.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    tokens = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS]
    g = torch.Generator().manual_seed(0)
    logits = []
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(out, 64).indices
        rand = torch.randperm(out.numel(), generator=g)[:512]
        pick = torch.cat([top, rand]).unique()
        logits.append(
            {
                "prompt": prompt,
                "ids": ids,
                "argmax": int(out.argmax()),
                "at": pick.tolist(),
                "values": [float(out[i]) for i in pick],
            }
        )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(
            {
                "source": f,
                "made_with": "transformers with gguf_file=, torch f32",
                "tokens": tokens,
                "logits": logits,
            },
            fh,
            ensure_ascii=False,
            indent=1,
        )
    print(a.out)


if __name__ == "__main__":
    main()

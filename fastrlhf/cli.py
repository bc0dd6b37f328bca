"""`fastrlhf` command line: train | eval | info. Each subcommand owns its flags."""
from __future__ import annotations

import sys

USAGE = """usage: fastrlhf {train,eval,info} [flags]

  train   run PPO / PPO-max / APA (no flags: the built-in tiny model on the arithmetic task)
  eval    score a checkpoint on held-out prompts
  info    report which backends are active (Triton, CUDA/CPU extension, flash-attn, bitsandbytes, GPU)

`fastrlhf <command> --help` lists a command's flags and defaults."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .train import main as run
    elif cmd == "eval":
        from .evaluate import eval_main as run
    elif cmd == "info":
        from .info import main as run
    else:
        print(f"fastrlhf: unknown command {cmd!r}; expected one of train, eval, info\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())

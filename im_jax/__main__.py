"""`im-jax COMMAND [ARGS]` (also `python -m im_jax COMMAND [ARGS]`): one program for every
entry point, the same as `python -m im_jax.COMMAND [ARGS]`."""

import difflib
import runpy
import sys

from im_jax import cli

# command -> the module `python -m` runs (each has its own --help)
COMMANDS = {
    "train": ("im_jax.train", "train from a config file, resuming in its workdir"),
    "eval": ("im_jax.eval", "held-out loss, generations"),
    "convert": ("im_jax.convert", "Hugging Face folders <-> im_jax checkpoints"),
    "plan": ("im_jax.plan", "compile a run for a (virtual) TPU or CPU topology: memory, FLOPs"),
    "data": ("im_jax.data", "data statistics, previews, length ratios"),
    "report": ("im_jax.report", "compare runs: losses, held-out metrics, plots"),
    "study": ("im_jax.study", "the IT vs IM study"),
}


def _usage() -> str:
  rows = "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items())
  return f"usage: im-jax COMMAND [ARGS]   (im-jax COMMAND --help for each)\n\n{rows}"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0 if argv else 2
  name = argv[0]
  if name not in COMMANDS:
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (one of {', '.join(COMMANDS)})"
    return cli.report(f"unknown command {name!r}{hint}")
  # The command's own parser reads sys.argv, as under `python -m im_jax.COMMAND`.
  sys.argv = [f"im-jax {name}", *argv[1:]]
  runpy.run_module(COMMANDS[name][0], run_name="__main__", alter_sys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

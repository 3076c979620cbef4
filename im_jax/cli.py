"""What the command-line entry points share: absl flag parsing whose errors are one line."""

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, but a bad config file, key or value is one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:  # ml-collections: an override of a key the config lacks
    key = str(e.args[0]).strip("\"'") if e.args else ""
    fail(f"unknown config key '{key}' (every key is in configs/base.py)")
  except Exception as e:  # noqa: BLE001 - flag errors wrap config-file exceptions of any type
    fail(last_line(e))


def last_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)

"""What the command-line entry points share: absl flag parsing whose errors are one line."""

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, but a bad config file, key or value is one line and exit status 2, and
  `--help` exits 0 (absl's exits 1)."""
  if any(arg in ("-h", "--help", "--helpshort") for arg in argv[1:]):
    main = sys.modules["__main__"]
    print((main.__doc__ or "").strip() + "\n\nflags:\n" + flags.FLAGS.module_help(main))
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except AttributeError:  # ml-collections: an override of a key the config lacks
    fail(_unknown_override(argv))
  except Exception as e:  # noqa: BLE001 - flag errors wrap config-file exceptions of any type
    fail(last_line(e))


def _unknown_override(argv: list[str]) -> str:
  """The first `--config.KEY=...` naming no key of configs/base.py, with a suggestion."""
  from im_jax.run import settings  # pylint: disable=g-import-not-at-top  (jax: slow)

  for arg in argv[1:]:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      try:
        settings.check_override_key(key)
      except settings.ConfigError as e:
        return str(e)
  return "unknown config key (every key is in im_jax/configs/base.py)"


def last_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  return lines[-1] if lines else type(e).__name__


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)

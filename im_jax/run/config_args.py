"""`--config FILE[:ARGS]` and `--config.KEY=VALUE` on the command line (train, plan).

FILE is a Python file whose `get_config()` (or `get_config(ARGS)`: everything after the first
colon) returns the run's ml-collections config; each `--config.KEY=VALUE` (or
`--config.KEY VALUE`) then overrides one key, in command-line order. A value is read as the
type of its key in im_jax/configs/base.py: `true`/`false` (also `t`/`f`, `1`/`0`, any case)
for a bool, including `data.strip_content` (unset by default), an integer, a number, or the
text as given. The config comes back locked: a key no file defines cannot be added.

Anything wrong (no such file, an error inside it, a key base.py lacks, a value of the wrong
type) raises `settings.ConfigError`, whose message names the file or the key.
"""

import argparse
import importlib.util
import pathlib
import sys
from collections.abc import Sequence

import ml_collections

from im_jax import cli
from im_jax.configs import base

PREFIX = "--config."
_TRUE, _FALSE = ("true", "t", "1"), ("false", "f", "0")


def _config_error(message: str) -> Exception:
  from im_jax.run.settings import ConfigError  # pylint: disable=g-import-not-at-top  (jax: slow)
  return ConfigError(message)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
  """(the other arguments, [(KEY, VALUE)]): `--config.KEY=VALUE`, or `--config.KEY VALUE`
  when the next argument is no option; a bare `--config.KEY` has the value None."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(PREFIX):
      key, has_value, value = arg[len(PREFIX):].partition("=")
      if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        value, has_value, i = argv[i + 1], True, i + 1
      overrides.append((key, value if has_value else None))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`FILE[:ARGS]` -> FILE's `get_config([ARGS])`."""
  path, has_args, config_args = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise _config_error(f"--config {path}: no such file")
  name = f"im_jax_config_{pathlib.Path(path).stem}"
  try:
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as an import would: dataclasses in the file look it up
    module_spec.loader.exec_module(module)
    config = module.get_config(config_args) if has_args else module.get_config()
  except (ValueError, OSError) as e:  # the file refuses its arguments (configs/paper.py)
    raise _config_error(f"--config {spec}: {e}") from None
  except Exception as e:  # noqa: BLE001 - a mistake in the file itself, whatever it is
    raise _config_error(f"--config {spec}: {type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise _config_error(f"--config {spec}: get_config() returned {type(config).__name__}, not "
                        "an ml_collections.ConfigDict")
  return config


def _typed_value(key: str, want: type, value: str | None):
  if want is bool:
    if value is None or value.lower() in _TRUE:  # a bare --config.KEY switches a bool on
      return True
    if value.lower() in _FALSE:
      return False
    raise _config_error(f"{PREFIX}{key}={value}: expected true or false")
  if value is None:
    raise _config_error(f"{PREFIX}{key} needs a value: {PREFIX}{key}=VALUE")
  try:
    return want(value) if want in (int, float) else value
  except ValueError:
    kind = "an integer" if want is int else "a number"
    raise _config_error(f"{PREFIX}{key}={value}: expected {kind}") from None


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str | None]]) -> None:
  """Sets each `(KEY, VALUE)` in `config`, VALUE read as KEY's type in configs/base.py."""
  reference = base.get_config()
  for key, value in overrides:
    *sections, name = key.split(".")
    ref, target = reference, config
    try:
      for section in sections:
        ref = ref[section]
      want = ref.get_type(name)
    except (KeyError, AttributeError, TypeError):
      want = None
    if want is None or isinstance(ref[name], ml_collections.ConfigDict):
      from im_jax.run import settings  # pylint: disable=g-import-not-at-top  (jax: slow)
      raise settings.ConfigError(settings.unknown_key_message(key))
    typed = _typed_value(key, want, value)
    try:
      for section in sections:
        target = target[section]
      target[name] = typed
    except (KeyError, AttributeError) as e:  # a config file that builds its own sections
      raise _config_error(f"{PREFIX}{key}: the config file has no such key "
                          "(every key is in im_jax/configs/base.py)") from e
    except TypeError as e:  # the file gave the key another type than base.py's
      raise _config_error(f"{PREFIX}{key}={value}: {e}") from None


class ConfigArgumentParser(cli.ArgumentParser):
  """`cli.ArgumentParser` with a required `--config FILE[:ARGS]` and any number of
  `--config.KEY=VALUE`; the parsed arguments hold `config_overrides`, and `load(args)` gives
  the config."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("epilog", "--config.KEY=VALUE sets any key of im_jax/configs/base.py "
                      "over the config file's\nvalue (e.g. --config.train.batch_size=32), in "
                      "command-line order.")
    super().__init__(*args, **kwargs)
    self.add_argument("--config", required=True, metavar="FILE[:ARGS]",
                      help="config file (configs/*.py): its get_config(ARGS)")

  def parse_known_args(self, args=None, namespace=None):
    rest, overrides = split_overrides(sys.argv[1:] if args is None else list(args))
    parsed, extra = super().parse_known_args(rest, namespace)
    parsed.config_overrides = overrides
    return parsed, extra


def load(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The config the command line gives: the file's, overridden, locked."""
  config = load_file(args.config)
  apply_overrides(config, args.config_overrides)
  config.lock()
  return config

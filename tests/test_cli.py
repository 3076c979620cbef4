"""The command line every entry point shares: `--config FILE[:ARGS]` with `--config.KEY=VALUE`
overrides read as base.py's types, one `error:` line and exit status 2 for a bad one, and
`--help` on every command (all in-process: no subprocess, no JAX backend)."""

import importlib.util
import pathlib

import pytest

from im_jax import __main__ as dispatcher
from im_jax import cli
from im_jax.run import config_args
from im_jax.run import settings
from im_jax.run.settings import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")


def _load(*argv):
  return config_args.load(config_args.ConfigArgumentParser(prog="t").parse_args(list(argv)))


def test_overrides_take_the_type_of_their_key_in_base():
  c = _load("--config", DEMO, "--config.train.batch_size=32", "--config.optim.lr", "1e-3",
            "--config.mesh.fsdp", "-1", "--config.export_hf=False", "--config.data.template=hf",
            "--config.data.strip_content=false", "--config.optim.b1=1",
            "--config.model.lora.targets=q,o,down", "--config.model.scan_layers")
  assert c.train.batch_size == 32 and c.optim.lr == 1e-3 and c.mesh.fsdp == -1
  assert c.export_hf is False and c.data.template == "hf" and c.model.scan_layers is True
  assert c.data.strip_content is False  # the placeholder bool, unset in base.py
  settings.check_keys_and_types(c)  # and a run takes it
  assert c.optim.b1 == 1.0 and isinstance(c.optim.b1, float)
  assert c.model.lora.targets == "q,o,down"
  assert c.train.max_steps == 400  # the file's own value where nothing overrides it
  for truthy in ("true", "True", "T", "1"):
    assert _load("--config", DEMO, f"--config.export_hf={truthy}").export_hf is True
  with pytest.raises(AttributeError):  # locked, as a run gets it: no new key
    c.train.batch_sise = 3


def test_the_last_override_wins_and_the_file_takes_arguments():
  c = _load(f"--config={ROOT / 'configs' / 'paper.py'}:lima,it,tiny",
            "--config.train.seed=1", "--config.train.seed=2")
  assert c.train.seed == 2 and c.loss.mode == "it"


@pytest.mark.parametrize("argv, message", [
    (["--config.train.batch_size=abc"], "--config.train.batch_size=abc: expected an integer"),
    (["--config.optim.lr=fast"], "--config.optim.lr=fast: expected a number"),
    (["--config.export_hf=maybe"], "--config.export_hf=maybe: expected true or false"),
    (["--config.data.formt=tulu"], "unknown config key data.formt (did you mean data.format?)"),
    (["--config.train=3"], "unknown config key train "),
    (["--config.train.batch_size"], "--config.train.batch_size needs a value"),
])
def test_a_bad_override_names_the_key(argv, message):
  with pytest.raises(ConfigError) as info:
    _load("--config", DEMO, *argv)
  assert str(info.value).startswith(message), str(info.value)


def test_a_bad_config_file_names_the_file(tmp_path):
  with pytest.raises(ConfigError, match=r"^--config nope\.py: no such file$"):
    _load("--config", "nope.py")
  with pytest.raises(ConfigError, match=r"^--config .*paper\.py:nope: expected "):
    _load("--config", str(ROOT / "configs" / "paper.py") + ":nope")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  with pytest.raises(ConfigError, match=r"^--config .*broken\.py: SyntaxError: "):
    _load("--config", str(broken))


def test_one_error_line_whatever_the_message(capsys):
  assert cli.report(ValueError("a\n  b\tc  ")) == cli.EXIT_BAD_INPUT == 2
  assert cli.report(OSError(), cli.EXIT_FAILED) == 1
  with pytest.raises(SystemExit) as info:
    cli.ArgumentParser(prog="python -m im_jax.x").parse_args(["--nope"])
  assert info.value.code == 2
  assert cli.report_lines("w holds other settings:\n  a: 1 -> 2\n  b: 3 -> 4") == 2
  assert capsys.readouterr().err.splitlines() == [
      "error: a b c", "error: OSError",
      "error: python -m im_jax.x: unrecognized arguments: --nope (--help lists the options)",
      "error: w holds other settings:", "  a: 1 -> 2", "  b: 3 -> 4"]


def _main(module: str):
  """The module whose main() `python -m MODULE` runs."""
  package = importlib.util.find_spec(module).submodule_search_locations is not None
  return importlib.import_module(f"{module}.__main__" if package else module)


@pytest.mark.parametrize("module", ["im_jax", *(m for m, _ in dispatcher.COMMANDS.values())])
def test_every_entry_point_and_subcommand_has_help(module, capsys):
  entry = _main(module)
  parser = entry._parser() if hasattr(entry, "_parser") else None  # pylint: disable=protected-access
  subcommands = [()]
  for action in getattr(parser, "_actions", ()):
    if getattr(action, "choices", None) and action.dest == "command":
      subcommands += [(name,) for name in action.choices]
  for sub in subcommands:
    try:
      code = entry.main([*sub, "--help"])
    except SystemExit as e:
      code = e.code
    out = capsys.readouterr().out
    assert code in (0, None) and "usage:" in out, (module, sub, out)


def test_multi_process_settings_are_options_of_train():
  from im_jax import distributed  # pylint: disable=g-import-not-at-top
  from im_jax.run import train  # pylint: disable=g-import-not-at-top

  args = train._parser().parse_args([  # pylint: disable=protected-access
      "--config", DEMO, "--workdir", "w", "--coordinator_address=h0:99", "--num_processes", "2",
      "--process_id=1"])
  assert distributed.explicit_settings(vars(args), {}) == distributed.Settings("h0:99", 2, 1)
  args = train._parser().parse_args(["--config", DEMO, "--workdir", "w"])  # pylint: disable=protected-access
  assert distributed.explicit_settings(vars(args), {}) is None

"""Every command line shown in README.md and docs/*.md still works, so the docs cannot drift.

Commands are collected generically: any `python -m im_jax...`, `im-jax COMMAND ...` (read as
`python -m im_jax.COMMAND ...`), `python scripts/...`,
`bash scripts/...` or `scripts/...` in a code block (continuation lines joined, leading
`VAR=value` settings dropped) or an inline code span. Each is checked against the code:

- `python -m im_jax.MODULE ...` for the modules in IN_PROCESS (their argparse `_parser()`):
  the arguments must parse (placeholders such as `DIR` stay strings, `[optional ...]` groups
  are dropped, `a|b` takes `a`);
- `python -m im_jax.train ...`: the config file and its arguments load, every
  `--config.KEY=VALUE` names a key of configs/base.py, and the result passes the same
  validation as a run (a large model is validated, never trained);
- any other `python -m im_jax.MODULE` (a new entry point, never imported here: it may set
  up other backends): `--help` in a subprocess exits 0 and lists every `--flag` the docs use.
  Commands containing a string of HELP_ONLY get only this check;
- `scripts/X.sh SUB`: with `--dry-run` when the script has it, else `bash -n`;
  `python scripts/X.py`: the file exists and defines every `--flag` shown.

A few cheap commands also run for real (data stats, every report command).
"""

import functools
import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from im_jax import __main__ as dispatcher
from im_jax.run import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEVICES = 8  # conftest's simulated CPU devices
# A command containing one of these is checked with --help only (e.g. one whose arguments
# only exist on a cluster).
HELP_ONLY: set[str] = set()
# Entry points whose parser is imported into this process and parsed in full.
IN_PROCESS = ("im_jax.data", "im_jax.convert", "im_jax.eval", "im_jax.report",
              "im_jax.study", "im_jax.plan")
_COMMAND = re.compile(r"(python -m im_jax\S*|python scripts/\S+|bash scripts/\S+|"
                      r"(?<![\w/.])scripts/\S+|(?<![\w/.-])im-jax \S+)(.*)")
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|\.\.\.")


def _code_lines(text: str) -> list[str]:
  """Lines of indented or fenced code blocks (continuations joined) and inline spans."""
  lines, fenced, pending = [], False, ""
  for line in text.splitlines():
    if line.strip().startswith("```"):
      fenced = not fenced
      continue
    if fenced or line.startswith("    ") or pending:
      joined = pending + " " + line.strip()
      if joined.endswith("\\"):
        pending = joined[:-1]
        continue
      lines.append(joined.strip())
      pending = ""
    else:
      lines += re.findall(r"`([^`]+)`", line)
  return lines


def _commands() -> list[tuple[str, str]]:
  found = []
  for doc in DOCS:
    for line in _code_lines(doc.read_text()):
      match = _COMMAND.search(line.split(" # ")[0].split("  #")[0])
      if match:
        command = (match.group(1) + match.group(2)).strip().rstrip("&").strip()
        if command.startswith("im-jax "):  # the console script: `python -m im_jax.X`
          name = command.split()[1]
          if _PLACEHOLDER.search(name):  # `im-jax COMMAND`: prose about the command itself
            continue
          assert name in dispatcher.COMMANDS, f"{doc.name}: im-jax has no command {name}"
          command = f"python -m {dispatcher.COMMANDS[name][0]}{command[len('im-jax ' + name):]}"
        found.append((doc.name, command))
  return sorted(set(found))


COMMANDS = _commands()


def _clean(args: list[str]) -> list[str]:
  """Doc placeholders to parseable arguments: drop `[...]` groups, `a|b` -> a."""
  out, depth = [], 0
  for arg in args:
    if depth == 0 and arg == "|":  # a pipe (or a diagram): the command ends here
      break
    opens, closes = arg.count("["), arg.count("]")
    if depth == 0 and opens and arg.startswith("["):
      depth += opens - closes
      continue
    if depth:
      depth += opens - closes
      continue
    out.append(arg.split("|")[0] if "|" in arg and not arg.startswith("--") else arg)
  return out


def test_commands_are_found():
  modules = {c.split()[2] for _, c in COMMANDS if c.startswith("python -m")}
  assert {"im_jax.train", "im_jax.convert", "im_jax.eval", "im_jax.report",
          "im_jax.data"} <= modules, modules
  assert any("tpu_vm.sh" in c for _, c in COMMANDS)


def _argparse_parser(module_name: str):
  for package_main in (f"{module_name}.__main__", module_name):
    try:
      module = importlib.import_module(package_main)
    except ModuleNotFoundError:
      continue
    for name in ("_parser", "build_parser"):
      if hasattr(module, name):
        return getattr(module, name)()
  return None


@functools.cache
def _help_text(module: str, subcommand: str | None) -> str:
  argv = [sys.executable, "-m", module, *([subcommand] if subcommand else []), "--help"]
  proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr[-2000:]}"
  return proc.stdout + proc.stderr


def _check_help(module: str, args: list[str]) -> None:
  sub = args[0] if args and not args[0].startswith("-") else None
  text = _help_text(module, sub)
  for flag in (a.split("=")[0] for a in args if a.startswith("--")):
    if not flag.startswith("--config."):
      assert flag in text, f"{module} {sub or ''}: {flag} is not in its --help"


def _check_train(args: list[str]) -> None:
  from im_jax.run import train  # pylint: disable=g-import-not-at-top

  train._parser().parse_args(args)  # pylint: disable=protected-access  (exit 2: a stale option)
  flags, overrides, i = {}, {}, 0
  while i < len(args):
    assert args[i].startswith("--"), f"stray argument {args[i]!r}"
    name, has_value, value = args[i][2:].partition("=")
    if not has_value and i + 1 < len(args) and not args[i + 1].startswith("--"):
      value, i = args[i + 1], i + 1  # `--config FILE`
    if name.startswith("config."):
      overrides[name[len("config."):]] = value
    else:
      flags[name] = value
    i += 1
  assert {"config", "workdir"} <= set(flags), "python -m im_jax.train needs --config and --workdir"
  assert set(flags) <= {"config", "workdir", "coordinator_address", "num_processes",
                        "process_id", "dry-run", "print-config"}, flags
  for key in overrides:
    settings.check_override_key(key)
  path, _, config_args = flags["config"].partition(":")
  if _PLACEHOLDER.search(pathlib.Path(path).stem) or not path:
    return
  module = importlib.import_module("configs." + pathlib.Path(path).stem)
  assert (ROOT / path).is_file(), path
  c = module.get_config(config_args) if config_args else module.get_config()
  for key, value in overrides.items():
    if _PLACEHOLDER.search(value):
      continue
    *section, name = key.split(".")
    target = c[section[0]] if section else c
    target[name] = type(target[name])(value) if not isinstance(target[name], bool) else \
        value.lower() == "true"
  settings.validate(c, num_devices=DEVICES, process_count=1)


def _check_script(args: list[str]) -> None:
  runner = None
  if args[0] in ("bash", "python"):
    runner, args = args[0], args[1:]
  script = ROOT / args[0]
  assert script.is_file(), f"{args[0]} does not exist"
  rest = args[1:]
  text = script.read_text()
  if script.suffix == ".py" or runner == "python":
    for flag in (a.split("=")[0] for a in rest if a.startswith("--")):
      assert f'"{flag}"' in text, f"{args[0]} defines no {flag}"
    return
  if "--dry-run" in text and rest and not _PLACEHOLDER.search(rest[-1]):
    rest = [a for a in rest if a != "--dry-run"]
    proc = subprocess.run(["bash", str(script), "--dry-run", *rest], cwd=ROOT, text=True,
                          capture_output=True, timeout=60,
                          env={**os.environ, "BUCKET": "gs://docs-test"})
    assert proc.returncode == 0, f"{args}: {proc.stderr[-1000:]}"
  else:
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_matches_the_code(doc, command):
  del doc
  args = _clean(shlex.split(command))
  if args[0] == "python" and args[1] == "-m":
    module, rest = args[2], args[3:]
    if any(s in command for s in HELP_ONLY):
      _check_help(module, rest)
    elif module == "im_jax.train":
      if rest:
        _check_train(rest)
    elif module in IN_PROCESS and (parser := _argparse_parser(module)) is not None:
      if rest:
        parser.parse_args(rest)  # SystemExit (exit 2) on a stale argument
    else:
      _check_help(module, rest)
  else:
    _check_script(args)


def test_docs_report_and_data_commands_run(tmp_path, shared_data_dir, monkeypatch):
  """The cheap ones for real: data stats on LIMA, every report command over stand-in runs."""
  from im_jax import report  # pylint: disable=g-import-not-at-top
  from im_jax.data.__main__ import main as data_main  # pylint: disable=g-import-not-at-top

  assert data_main(["stats", "--data", str(shared_data_dir / "lima.jsonl"), "--json"]) == 0
  monkeypatch.chdir(tmp_path)
  shown = [c for _, c in COMMANDS if c.startswith("python -m im_jax.report ")]
  assert shown
  for command in shown:
    args = _clean(shlex.split(command))[3:]
    for workdir in report._parser().parse_args(args).workdir:  # pylint: disable=protected-access
      pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
      (pathlib.Path(workdir) / "metrics.jsonl").write_text(
          '{"step": 1, "loss": 2.0, "output_loss": 2.0, "instruction_loss": 3.0}\n')
    assert report.main(args) == 0, command

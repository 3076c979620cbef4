"""The package's promises: pyproject.toml and requirements.txt pin the same versions, the
default install holds every import the runtime makes, each optional import belongs to an
extra, and `im-jax COMMAND` is `python -m im_jax.COMMAND`."""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Imported inside a try/except ImportError and provided by no distribution of its own.
OPTIONAL_NAMESPACES = {"jax_plugins"}
# Modules that exist for an extra's feature and import it when they load; every other module
# imports them inside a function, so the default install never loads them.
OPTIONAL_MODULES = {"im_jax.eval.harness_lm": "eval"}


def _name(requirement: str) -> str:
  """PEP 503 normal form of a requirement's distribution name (extras dropped)."""
  return re.sub(r"[-_.]+", "-", re.split(r"[\[=<>~! ;]", requirement, 1)[0]).lower()


def _pins(requirements: list[str]) -> dict[str, str]:
  pins = {}
  for line in requirements:
    line = line.split("#", 1)[0].strip()
    if line and not line.startswith("im-jax"):
      name, sep, version = line.partition("==")
      assert sep, f"{line!r} is not pinned exactly"
      pins[_name(name)] = version.strip()
  return pins


def test_pyproject_and_requirements_pin_the_same_versions():
  required = _pins((ROOT / "requirements.txt").read_text().splitlines())
  runtime = _pins(PYPROJECT["dependencies"])
  extras = {name: _pins(reqs) for name, reqs in PYPROJECT["optional-dependencies"].items()}
  declared = dict(runtime)
  for name, pins in extras.items():
    for dist, version in pins.items():
      assert declared.setdefault(dist, version) == version, f"{dist}: two versions ({name})"
  assert declared == required, (
      f"only in pyproject: {sorted(declared.keys() - required.keys())}; "
      f"only in requirements.txt: {sorted(required.keys() - declared.keys())}; differ: "
      f"{sorted(k for k in declared.keys() & required.keys() if declared[k] != required[k])}")


def _imports(path: pathlib.Path, full: bool = False) -> tuple[set[str], set[str]]:
  """(names imported when the module loads, names imported inside functions): top-level
  package names, or with `full` every dotted name (`from a.b import c` gives a.b and a.b.c)."""
  tree = ast.parse(path.read_text())
  eager, lazy, at_load = set(), set(), set()

  def names(node):
    if isinstance(node, ast.Import):
      return {a.name if full else a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if not full:
        return {node.module.split(".")[0]}
      return {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return set()

  for node in tree.body:  # module level, including inside a top-level try/if
    for inner in ([node] if not isinstance(node, (ast.Try, ast.If)) else ast.walk(node)):
      eager |= names(inner)
      at_load.add(id(inner))
  for node in ast.walk(tree):
    if id(node) not in at_load:
      lazy |= names(node)
  return eager, lazy


def test_default_install_holds_every_import_the_runtime_makes():
  distributions = importlib.metadata.packages_distributions()
  runtime = {_name(r) for r in PYPROJECT["dependencies"]}
  optional = {_name(r) for reqs in PYPROJECT["optional-dependencies"].values() for r in reqs}
  local = {"im_jax", *sys.stdlib_module_names, *OPTIONAL_NAMESPACES}
  problems = []
  for path in sorted((ROOT / "im_jax").rglob("*.py")):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    eager, lazy = _imports(path)
    eager_at_load = runtime
    if module in OPTIONAL_MODULES:
      extra = OPTIONAL_MODULES[module]
      eager_at_load = runtime | {_name(r) for r in PYPROJECT["optional-dependencies"][extra]}
    for name in sorted(_imports(path, full=True)[0] & set(OPTIONAL_MODULES)):
      problems.append(f"{path.relative_to(ROOT)} imports {name} when it loads: it needs the "
                      f"{OPTIONAL_MODULES[name]} extra, so import it inside a function")
    for kind, names, allowed in (("imports", eager, eager_at_load),
                                 ("imports in a function", lazy, runtime | optional)):
      for name in sorted(names - local):
        dists = {_name(d) for d in distributions.get(name, [])}
        if not dists & allowed:
          problems.append(f"{path.relative_to(ROOT)} {kind} {name} ({sorted(dists)}): not in "
                          f"{'any extra' if kind.endswith('function') else 'its install'}")
  assert not problems, "\n".join(problems)


def _im_jax(*args):
  return subprocess.run([sys.executable, "-m", "im_jax", *args], cwd=ROOT, text=True,
                        capture_output=True, timeout=120)


def test_im_jax_command_runs_each_entry_point():
  listing = _im_jax("--help")
  assert listing.returncode == 0 and "train" in listing.stdout and "report" in listing.stdout
  typo = _im_jax("reprot")
  assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
      "error: unknown command 'reprot' (did you mean report?)"]
  report = _im_jax("report", "--help")
  assert report.returncode == 0 and "--workdir" in report.stdout, report.stderr[-2000:]


def test_console_script_is_declared_for_the_dispatcher():
  from im_jax import __main__ as dispatcher  # pylint: disable=import-outside-toplevel

  assert PYPROJECT["scripts"] == {"im-jax": "im_jax.__main__:main"}
  for name, (module, _) in dispatcher.COMMANDS.items():
    assert (ROOT / module.replace(".", "/")).with_suffix(".py").exists() or \
        (ROOT / module.replace(".", "/") / "__main__.py").exists(), name


@pytest.mark.parametrize("config", ["configs/demo.py", "configs/paper.py:lima,im,tiny"])
def test_config_files_load_from_any_folder(tmp_path, config):
  """A config file imports the package's building blocks, not a path-dependent `configs`."""
  path, _, args = config.partition(":")
  code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', "
          f"{str(ROOT / path)!r}); m = importlib.util.module_from_spec(spec); "
          "spec.loader.exec_module(m); "
          f"print(m.get_config({args!r}) if {bool(args)} else m.get_config())")
  # The package alone on the path, as an install provides it: not the repository root, where
  # `import configs` would also work.
  site = tmp_path / "site"
  site.mkdir()
  (site / "im_jax").symlink_to(ROOT / "im_jax")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, text=True,
                        capture_output=True, timeout=120,
                        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "model:" in proc.stdout


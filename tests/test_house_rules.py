"""The house's rules, read from the source (ast and text only: no import, no JAX): the import
directions docs/design.md states, and every docs file or section the code points a reader to."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "im_jax"
# The program's wiring (config files -> a running experiment) and the programs built on it:
# above every library part.
WIRING = ("run", "study", "plan", "report")
# part -> the parts of im_jax it must not import (docs/design.md, "What may import what").
# Entry points (`__main__` modules) are the top layer and exempt.
FORBIDDEN = {
    "data": ("models", "train", "checkpoint", "convert", "eval", *WIRING),
    "models": ("data", "train", "checkpoint", "convert", "eval", *WIRING),
    "checkpoint": ("data", "models", "train", "convert", "eval", *WIRING),
    "train": ("convert", "eval", *WIRING),
    "convert": ("train", "eval", *WIRING),
    "eval": WIRING,
}
# Standalone helpers: they import nothing of im_jax but one another.
STANDALONE = ("paths", "write_faults", "output_guard", "hub", "model_files", "distributed",
              "malloc_tuning", "cli")


def _im_jax_imports(path: pathlib.Path) -> set[str]:
  """The im_jax parts (first name below im_jax) a module imports, anywhere in it."""
  parts = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    parts |= {n.split(".")[1] for n in names if n.startswith("im_jax.")}
  return parts


def _part(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE).parts
  return rel[0] if len(rel) > 1 else path.stem


def test_imports_point_one_way():
  modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__main__.py"]
  parts = {_part(p) for p in modules}
  assert FORBIDDEN.keys() | set(STANDALONE) <= parts  # no rule about a part that is gone
  wrong = []
  for path in modules:
    part = _part(path)
    banned = parts - set(STANDALONE) - {"__init__"} if part in STANDALONE else FORBIDDEN.get(part)
    if banned:
      wrong += [f"{path.relative_to(ROOT)} imports im_jax.{p}"
                for p in sorted(_im_jax_imports(path) & set(banned))]
  # Config files import the library, never the reverse: no im_jax module imports the
  # repository's configs/ folder (im_jax/configs is the package's own key schema).
  wrong += [f"{path.relative_to(ROOT)} imports configs" for path in modules
            if _imports_repository_configs(path)]
  assert not wrong, "\n".join(wrong)


def _imports_repository_configs(path: pathlib.Path) -> bool:
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "configs" for a in node.names):
      return True
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
        node.module.split(".")[0] == "configs":
      return True
  return False


def test_the_rules_catch_an_upward_import(tmp_path):
  module = tmp_path / "m.py"
  module.write_text("import os\ndef f():\n  from im_jax.train import loss\n"
                    "from im_jax import run, paths\nfrom configs import paper\n")
  assert _im_jax_imports(module) == {"train", "run", "paths"}
  assert _imports_repository_configs(module)


def _mentions() -> list[tuple[pathlib.Path, str, str | None]]:
  """(file, docs file, section or None) for each `docs/X.md` / `README` reference in the code:
  `docs/X.md`, `docs/X.md, Section)`, `README: Section)`."""
  found = []
  sources = [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.*"),
             *(ROOT / "configs").glob("*.py")]
  for path in sources:
    text = path.read_text(encoding="utf-8")
    for m in re.finditer(r"\b(docs/[\w./-]+?\.md|README(?:\.md)?)(?:(?:,|:) ([A-Z][\w ]*)\))?",
                         text):
      found.append((path, m.group(1), m.group(2)))
  return found


def test_docs_the_code_points_to_exist():
  mentions = _mentions()
  assert any(doc == "docs/paper.md" for _, doc, _ in mentions)  # the search finds them
  wrong = []
  for path, doc, section in mentions:
    target = ROOT / ("README.md" if doc.startswith("README") else doc)
    if not target.is_file():
      wrong.append(f"{path.relative_to(ROOT)}: {doc}: no such file")
    elif section and not re.search(rf"^#+ {re.escape(section)}\b", target.read_text(), re.M):
      wrong.append(f"{path.relative_to(ROOT)}: {doc} has no section {section!r}")
  assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("doc", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))],
                         ids=lambda p: p.name)
def test_links_between_docs_resolve(doc):
  for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", doc.read_text()):
    assert (doc.parent / target).is_file(), f"{doc.name} links to {target}: no such file"

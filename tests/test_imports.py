"""The shape of the code: no import cycles in bigvl/, no module-level import of data_pipelines/, and a
training loop that names no system and no modality."""

import ast
import os
import re

from conftest import REPO

BIGVL = os.path.join(REPO, "bigvl")
# Every system of shared/docs/papers.md, by the names its package and configs use.
SYSTEM_NAMES = ("m2_encoder", "m2", "m²", "sycoca", "tai_adapter", "switch_bert", "dmae", "negnce",
                "tpm_cl", "snp_s3", "tsgsv", "scene", "pink", "eve", "contrastive", "coca")
MODALITY = ("image", "text", "embed")


def _modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(BIGVL):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def _module_level_imports(path: str, module: str, is_package: bool) -> list[str]:
  """Modules imported when `module` is imported: statements outside function bodies (class bodies
  and `if`/`try` blocks run at import; `if TYPE_CHECKING:` blocks are counted too)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  package = module if is_package else module.rpartition(".")[0]
  found = []

  def visit(nodes):
    for node in nodes:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        continue
      if isinstance(node, ast.Import):
        found.extend(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        # `from pkg import sub` runs pkg/__init__ and then pkg.sub: both are edges (a package whose
        # __init__ imports a module that imports the package back is a circle).
        found.append(base)
        found.extend(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
      for field in ("body", "orelse", "finalbody", "handlers"):
        visit(getattr(node, field, []) if not isinstance(node, ast.FunctionDef) else [])
  visit(tree.body)
  return found


MODULES = _modules()


def _graph():
  modules = MODULES
  graph = {}
  for name, path in modules.items():
    imported = _module_level_imports(path, name, path.endswith("__init__.py"))
    graph[name] = {m for m in imported if m in modules and m != name}
  return modules, graph


def _cycles(graph):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))
  for v in sorted(graph):
    if v not in index:
      strong(v)
  return out


def test_no_import_cycle_in_bigvl():
  _, graph = _graph()
  assert _cycles(graph) == []


def test_every_system_of_the_table_is_a_system():
  from bigvl import systems
  from bigvl.systems import base
  for name in systems.SYSTEMS:
    assert issubclass(systems.get(name), base.System), name


def test_the_cycle_finder_finds_cycles():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_bigvl_never_imports_data_pipelines_at_module_level():
  modules = MODULES
  bad = {name: [m for m in _module_level_imports(path, name, path.endswith("__init__.py"))
                if m.split(".")[0] == "data_pipelines"] for name, path in modules.items()}
  assert {k: v for k, v in bad.items() if v} == {}


def _words(text: str) -> list[str]:
  """Identifier parts: snake_case and CamelCase pieces, lower-cased."""
  out = []
  for ident in re.findall(r"[A-Za-z_][A-Za-z0-9_²]*", text):
    for part in ident.split("_"):
      out += [p.lower() for p in re.findall(r"[A-Z]?[a-z0-9²]+|[A-Z]+(?![a-z])", part) or [part]]
  return out


def test_the_training_loop_names_no_system_and_no_modality():
  train = os.path.join(BIGVL, "train")
  found = []
  for f in sorted(os.listdir(train)):
    if not f.endswith(".py"):
      continue
    text = open(os.path.join(train, f), encoding="utf-8").read()
    for w in _words(text):
      if w in SYSTEM_NAMES or w.startswith(MODALITY):
        found.append(f"{f}: {w}")
    found += [f"{f}: M²" for _ in re.findall("M²", text)]
  assert found == []


def test_the_word_check_would_see_them():
  assert {"image", "m2", "encoder", "embed", "towers"} <= set(_words("encode_image(M2Encoder), embedTowers"))
  assert "text" not in _words("contextlib.nullcontext")

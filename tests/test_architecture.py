"""The layering of docs/architecture.md: imports point down the layers, and no module imports a
private name from another module. Read from the source with ``ast`` (imports inside functions too)."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ngdiag"

#: docs/architecture.md's layers, bottom first: a module may import its own layer and those below.
LAYERS = {
    "ngdiag.core": 0,
    "ngdiag.models": 1,
    "ngdiag.testing": 1,
    "ngdiag.world.scene": 1,
    "ngdiag.world.judge": 1,
    "ngdiag.quality": 2,
    "ngdiag.probes": 2,
    "ngdiag.stats": 2,
    "ngdiag.rewards": 2,
    "ngdiag.sensitivity": 2,
    "ngdiag.report": 2,
    "ngdiag.runs": 3,
    "ngdiag.workflows": 4,
    "ngdiag.train": 4,
    "ngdiag.world": 4,
    "ngdiag.cli": 5,
    "ngdiag.demo": 5,
}


def layer_of(module: str):
    """The layer of a dotted module name (its longest listed prefix), None for ``ngdiag`` itself."""
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def ngdiag_imports(source: str, text: str, is_package: bool = False):
    """``(line, module, names)`` for every import of an ngdiag module in ``text``, the code of ``source``."""
    package = source if is_package else source.rpartition(".")[0]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([module] if module else []))
            if module == "ngdiag" or module.startswith("ngdiag."):
                yield node.lineno, module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ngdiag" or alias.name.startswith("ngdiag."):
                    yield node.lineno, alias.name, []


def upward_imports(source: str, text: str, is_package: bool = False) -> list:
    """The imports in ``text`` of a module in a higher layer than ``source``'s."""
    own = layer_of(source)
    found = []
    for line, module, names in ngdiag_imports(source, text, is_package):
        # ``from ngdiag.x import y`` may import the submodule ngdiag.x.y: judge the most specific name
        for target in [f"{module}.{n}" for n in names] or [module]:
            if not is_module(target):
                target = module
            layer = layer_of(target)
            if own is not None and layer is not None and layer > own:
                found.append(f"line {line}: {target} (layer {layer} above {own})")
    return found


def private_imports(source: str, text: str, is_package: bool = False) -> list:
    """The ``_names`` that ``text`` imports from other ngdiag modules."""
    return [
        f"line {line}: {name} from {module}"
        for line, module, names in ngdiag_imports(source, text, is_package)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in MODULES if module_name(p) != "ngdiag" and layer_of(module_name(p)) is None]
    assert not missing, f"modules without a layer in docs/architecture.md: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_point_down_the_layers_and_no_private_name_is_imported(path):
    source, text, is_package = module_name(path), path.read_text(encoding="utf-8"), path.name == "__init__.py"
    assert upward_imports(source, text, is_package) == []
    assert private_imports(source, text, is_package) == []


def test_the_checks_find_upward_and_private_imports():
    code = (
        "import torch\n"
        "from ngdiag.core.errors import ConfigError\n"
        "def f():\n"
        "    from ngdiag.cli.common import Progress\n"
        "    from .. import workflows\n"
        "    from ngdiag.models.loading import _read_json\n"
    )
    assert upward_imports("ngdiag.core.sampling", code) == [
        "line 4: ngdiag.cli.common (layer 5 above 0)",
        "line 5: ngdiag.workflows (layer 4 above 0)",
        "line 6: ngdiag.models.loading (layer 1 above 0)",
    ]
    assert upward_imports("ngdiag.cli.app", code) == []
    assert private_imports("ngdiag.core.sampling", code) == ["line 6: _read_json from ngdiag.models.loading"]


def test_public_api_resolves_and_type_checkers_see_every_name():
    # Every lazy export resolves to an object of its module, and the TYPE_CHECKING block imports
    # exactly the same names from the same modules (what IDEs and type checkers see).
    import ngdiag

    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {
        a.asname or a.name: node.module + ("" if a.asname is None else f":{a.name}")
        for node in block.body if isinstance(node, ast.ImportFrom) for a in node.names
    }
    assert seen == ngdiag._LAZY
    import ngdiag.train.trainer  # noqa: F401  (a loaded subpackage must not shadow a public name)

    for name, target in ngdiag._LAZY.items():
        module, _, attribute = target.partition(":")
        obj = getattr(ngdiag, name)
        assert obj is getattr(importlib.import_module(module), attribute or name) and obj.__module__ == module, name
    assert set(ngdiag.__all__) == {"__version__", *ngdiag._LAZY} and "GuidedVelocity" not in dir(ngdiag)

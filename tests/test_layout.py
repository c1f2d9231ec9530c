"""The layout keeps the design's promises: `platform/` names no modality and no task kind, the layers import
only downwards, no module-level import cycle, and every module imports on its own."""

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "biofm"
MODALITY_WORDS = ["molecule", "molecules", "smiles", "ehr", "meds", "wsi", "slide", "slides", "oct", "tabular", "text"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _code_words(path: Path) -> list[tuple[int, str]]:
    """The tokens of a file that are code (names and strings), without its comments and docstrings."""
    words, previous = [], tokenize.NEWLINE
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.COMMENT or token.type == tokenize.NL:
            continue
        docstring = token.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if not docstring and token.type in (
            tokenize.NAME,
            tokenize.STRING,
            getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING),
        ):
            words.append((token.start[0], token.string))
        previous = token.type
    return words


def _found(words: list[str], paths) -> list[str]:
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    return [
        f"{path.name}:{line}: {text[:80]}" for path in paths for line, text in _code_words(path) if pattern.search(text)
    ]


def test_the_platform_names_no_modality_and_no_task_kind():
    from biofm.platform.modality import MODALITIES
    from biofm.tasks import TASK_KINDS

    platform = sorted((ROOT / "platform").rglob("*.py"))
    assert _found(sorted(set(MODALITY_WORDS) | set(MODALITIES.names())), platform) == []
    assert _found(TASK_KINDS.names(), platform) == []


def test_the_scan_finds_a_modality_or_kind_named_in_code(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        '"""Docstrings may say smiles and binary."""\n# so may comments: wsi\n'
        'KEYWORD = "smiles"\nif spec["kind"] == "binary":\n    pass\n'
    )
    assert len(_found(["smiles"], [planted])) == 1 and len(_found(["binary"], [planted])) == 1
    assert _found(["wsi"], [planted]) == []


def _imports(path: Path, modules: dict, top_level: bool) -> set[str]:
    """The biofm modules a file imports (at module level only, or anywhere in it); `from a import b` of a
    submodule b is an import of `a.b`."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            out |= subs if subs and len(subs) == len(node.names) else {node.module} | subs
    return {m for m in out if m in modules}


LAYERS = {  # a module under the first may not import (anywhere in it) a module under any of the others
    "biofm.registry": ("biofm.",),
    "biofm.commands": ("biofm.",),
    "biofm.tasks": ("biofm.platform", "biofm.modalities", "biofm.datasets", "biofm.recipes"),
    "biofm.platform": ("biofm.modalities", "biofm.datasets", "biofm.recipes"),
    "biofm.modalities": ("biofm.datasets", "biofm.recipes"),
    "biofm.datasets": ("biofm.recipes",),
}


def test_the_layers_import_only_downwards():
    modules = _modules()
    broken = []
    for name, path in modules.items():
        for layer, below in LAYERS.items():
            if name == layer or name.startswith(layer + "."):
                broken += [
                    f"{name} imports {m}"
                    for m in _imports(path, modules, top_level=False)
                    if m.startswith(below) and m != name
                ]
    assert broken == []


def test_no_module_level_import_cycle():
    modules = _modules()
    graph = {m: _imports(p, modules, top_level=True) for m, p in modules.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported first, in a namespace where no other biofm module is loaded yet."""
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(m for m in _modules() if m != 'biofm.__main__')!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'biofm' or m.startswith('biofm.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

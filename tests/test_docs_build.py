"""The API reference lists every module and its pages exist (the build itself is ``.ci/run``'s ``sphinx-build -W``)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import datamodules
import hyperlit

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _documented_modules() -> list[str]:
    return [
        m for page in sorted((DOCS / "api").glob("*.rst")) for m in re.findall(r"automodule:: (\S+)", page.read_text())
    ]


def _package_modules() -> set[str]:
    names = {hyperlit.__name__, datamodules.__name__}
    for pkg in (hyperlit, datamodules):
        names.update(m.name for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."))
    return {n for n in names if not n.endswith(".__main__")}


def test_every_module_has_an_api_section_once() -> None:
    documented = _documented_modules()
    missing = sorted(_package_modules() - set(documented))
    assert not missing, f"add these modules to a page in docs/api/ (an `.. automodule::` section): {missing}"
    twice = sorted({m for m in documented if documented.count(m) > 1})
    assert not twice, f"modules documented twice in docs/api/ (duplicate object warnings): {twice}"


def test_documented_modules_import() -> None:
    for name in _documented_modules():
        importlib.import_module(name)


def test_toctree_entries_exist() -> None:
    index = (DOCS / "index.md").read_text()
    blocks = re.findall(r"```\{toctree\}\n(.*?)```", index, flags=re.S)
    entries = [
        line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith(":")
    ]
    assert "api/hyperlit" in entries and "benchmarks" in entries and "bring_your_own" in entries
    missing = [e for e in entries if not any((DOCS / f"{e}{ext}").is_file() for ext in (".md", ".rst"))]
    assert not missing, f"toctree entries of docs/index.md without a page: {missing}"
    assert "```{include} ../README.md" in index

"""The import rules of docs/architecture.md, checked statically: every source file is parsed
with `ast`, nothing is imported or executed.

1. Domain modules (models, ports, engines, pipelines, the transport-free core of
   services/common) import no grpc, grpc_*, pymilvus or generated `*_pb2*` module,
   anywhere in the file (function-level and TYPE_CHECKING imports included); nor do the
   modules of this repository they load at import time.
2. Within services/, only the Milvus adapters (services/search/milvus_store.py and
   versions.py, the index's alias and versions) import pymilvus.
3. mmsearch/client/** and mmsearch/cli/** import nothing of the servers at import time:
   no module-level `services`, `mmsearch.suite`, torch, pymilvus or milvus_lite
   (module level = statements run when the module is imported: the module body, and
   top-level try/if/with/class bodies; not function bodies, not `if TYPE_CHECKING:`).
4. services/ never imports mmsearch.client.

A rule the code breaks today is listed in KNOWN_BREAKS with why; an entry that no longer
matches anything fails too, so the list only shrinks.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

DOMAIN_MODULES = (
    "services/common/errors.py",
    "services/common/deadline.py",
    "services/common/settings.py",
    "services/common/images.py",
    "services/common/upstream.py",
    "services/search/domain.py",
    "services/search/ports.py",
    "services/search/engine.py",
    "services/search/ingest.py",
    "services/search/backfill.py",
    "services/search/catalog.py",
    "services/search/binding.py",
    "services/search/validation.py",
    "services/search/fields.py",
    "services/embedder/engine.py",
    "services/embedder/batching.py",
    "services/captioner/service.py",
)
PYMILVUS_OWNERS = ("services/search/milvus_store.py", "services/search/versions.py")
SERVER_ONLY = ("services", "mmsearch.suite", "torch", "pymilvus", "milvus_lite")

# (rule, file, imported module) -> why it is still there. Remove the entry with the import.
KNOWN_BREAKS: dict[tuple[str, str, str], str] = {
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository
    line: int
    module: str  # `a.b` for `import a.b` and `from a.b import name`; `a.b.c` when c is a module
    module_level: bool
    via: str = ""  # for a module reached from a domain module: the import chain

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.module}" + (f" (reached: {self.via})" if self.via else "")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _package_of(rel: str) -> list[str]:
    parts = rel.removesuffix(".py").split("/")
    return parts[:-1]  # __init__.py: the package itself; other modules: their package


def _targets(node: ast.Import | ast.ImportFrom, rel: str) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = node.module or ""
    if node.level:
        package = _package_of(rel)
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    for alias in node.names:
        # the name may be a submodule (`from services.search import fields`, `from pkg.v1 import types_pb2`)
        sub = f"{base}.{alias.name}"
        path = REPO / sub.replace(".", "/")
        is_module = alias.name != "*" and ("_pb2" in alias.name or path.with_suffix(".py").is_file() or path.is_dir())
        yield sub if is_module else base


def imports_of(rel: str, source: str | None = None) -> list[Import]:
    """Every import statement of a file, each marked as run at import time or not."""
    tree = ast.parse(source if source is not None else (REPO / rel).read_text(), filename=rel)
    found: list[Import] = []

    def visit(nodes: list[ast.stmt], module_level: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.extend(Import(rel, node.lineno, target, module_level)
                             for target in dict.fromkeys(_targets(node, rel)))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(node.body, False)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, module_level)  # a class body runs when the module is imported
            elif isinstance(node, ast.If):
                visit(node.body, module_level and not _is_type_checking(node.test))
                visit(node.orelse, module_level)
            elif isinstance(node, ast.Try | ast.TryStar):
                visit(node.body, module_level)
                for handler in node.handlers:
                    visit(handler.body, module_level)
                visit(node.orelse, module_level)
                visit(node.finalbody, module_level)
            elif isinstance(node, ast.With | ast.AsyncWith | ast.For | ast.AsyncFor | ast.While):
                visit(node.body, module_level)
                visit(getattr(node, "orelse", []), module_level)
            elif isinstance(node, ast.Match):
                for case in node.cases:
                    visit(case.body, module_level)

    visit(tree.body, True)
    return found


def sources(*folders: str) -> list[str]:
    return sorted(str(p.relative_to(REPO)) for folder in folders for p in (REPO / folder).rglob("*.py")
                  if "_pb2" not in p.name)


def is_or_under(module: str, roots: tuple[str, ...]) -> str | None:
    for root in roots:
        if module == root or module.startswith(root + "."):
            return root
    return None


def transport_or_store(module: str) -> bool:
    parts = module.split(".")
    top = parts[0]
    return top in ("grpc", "pymilvus") or top.startswith("grpc_") or any("_pb2" in part for part in parts)


def domain_violations() -> list[Import]:
    return [imp for rel in DOMAIN_MODULES if (REPO / rel).is_file()
            for imp in imports_of(rel) if transport_or_store(imp.module)]


def repo_file(module: str) -> str | None:
    path = REPO / module.replace(".", "/")
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file() and "_pb2" not in candidate.name:
            return str(candidate.relative_to(REPO))
    return None


def domain_transitive_violations() -> list[Import]:
    """What importing a domain module loads: our modules it reaches through import-time
    imports must not import grpc / pymilvus / *_pb2 at import time either."""
    found: dict[tuple[str, int, str], Import] = {}
    for start in DOMAIN_MODULES:
        seen, todo = {start}, [(start, [start])]
        while todo:
            rel, chain = todo.pop()
            for imp in imports_of(rel):
                if not imp.module_level:
                    continue
                if transport_or_store(imp.module):
                    if rel != start:  # the direct ones are rule 1's
                        found.setdefault((rel, imp.line, imp.module),
                                         Import(rel, imp.line, imp.module, True, via=" -> ".join(chain)))
                elif (target := repo_file(imp.module)) and target not in seen:
                    seen.add(target)
                    todo.append((target, [*chain, target]))
    return list(found.values())


def pymilvus_violations() -> list[Import]:
    return [imp for rel in sources("services") if rel not in PYMILVUS_OWNERS
            for imp in imports_of(rel) if is_or_under(imp.module, ("pymilvus", "milvus_lite"))]


def client_import_time_violations() -> list[Import]:
    return [imp for rel in sources("mmsearch/client", "mmsearch/cli")
            for imp in imports_of(rel) if imp.module_level and is_or_under(imp.module, SERVER_ONLY)]


def services_client_violations() -> list[Import]:
    return [imp for rel in sources("services") for imp in imports_of(rel)
            if is_or_under(imp.module, ("mmsearch.client",))]


RULES = {
    "domain": domain_violations,
    "domain-transitive": domain_transitive_violations,
    "pymilvus": pymilvus_violations,
    "client-import-time": client_import_time_violations,
    "services-no-client": services_client_violations,
}


def new_breaks(rule: str, found: list[Import]) -> str:
    """The violations not excused in KNOWN_BREAKS, one line each."""
    return "\n".join(str(imp) for imp in found if (rule, imp.file, imp.module) not in KNOWN_BREAKS)


# --- 1. the domain is free of transport and store -------------------------------------------------

def test_domain_modules_exist() -> None:
    missing = [rel for rel in DOMAIN_MODULES if not (REPO / rel).is_file()]
    assert not missing, f"DOMAIN_MODULES names files that are gone (update the list and docs/architecture.md): {missing}"


@pytest.mark.parametrize("rel", DOMAIN_MODULES)
def test_domain_module_imports_no_grpc_pymilvus_or_generated_code(rel: str) -> None:
    new = new_breaks("domain", [imp for imp in domain_violations() if imp.file == rel])
    assert not new, ("domain modules never import grpc, grpc_*, pymilvus or generated *_pb2 modules "
                     "(convert in the servicer / upstream client / store instead):\n" + new)


def test_what_domain_modules_load_imports_no_grpc_pymilvus_or_generated_code() -> None:
    new = new_breaks("domain-transitive", domain_transitive_violations())
    assert not new, ("a module that a domain module imports (at import time) imports grpc, grpc_*, pymilvus or "
                     "generated *_pb2 code, so the domain loads it too:\n" + new)


# --- 2. one Milvus adapter --------------------------------------------------------------------------

def test_only_the_milvus_adapters_import_pymilvus() -> None:
    new = new_breaks("pymilvus", pymilvus_violations())
    assert not new, (f"within services/, only {', '.join(PYMILVUS_OWNERS)} imports pymilvus "
                     "(the ports.VectorStore adapter):\n" + new)


# --- 3. the client distribution loads nothing of the servers ----------------------------------------

def test_client_and_cli_import_no_server_code_at_import_time() -> None:
    new = new_breaks("client-import-time", client_import_time_violations())
    assert not new, ("mmsearch.client / mmsearch.cli import no services, mmsearch.suite, torch, pymilvus or "
                     "milvus_lite at module level (the client-only install has none of them; import inside the "
                     "local-suite commands instead):\n" + new)


def test_cli_modules_excused_above_are_imported_lazily() -> None:
    """A module allowed a server import at module level (KNOWN_BREAKS) is itself imported
    only inside functions, so importing mmsearch.cli.main still loads none of the servers."""
    excused = {file.removesuffix(".py").replace("/", ".") for rule, file, _ in KNOWN_BREAKS
               if rule == "client-import-time"}
    found = [str(imp) for rel in sources("mmsearch/client", "mmsearch/cli")
             for imp in imports_of(rel) if imp.module_level and imp.module in excused]
    assert not found, f"these modules import server code at import time, so import them inside a function: {found}"


# --- 4. the services do not depend on the client library --------------------------------------------

def test_services_do_not_import_the_client() -> None:
    new = new_breaks("services-no-client", services_client_violations())
    assert not new, "services/ never imports mmsearch.client (it is the callers' library):\n" + new


# --- the checker itself ----------------------------------------------------------------------------

def test_known_breaks_are_still_breaks() -> None:
    current = {(rule, imp.file, imp.module) for rule, violations in RULES.items() for imp in violations()}
    stale = [key for key in KNOWN_BREAKS if key not in current]
    assert not stale, f"KNOWN_BREAKS entries that no longer match an import (delete them): {stale}"


def test_the_checker_is_not_vacuous() -> None:
    source = (
        "import grpc\n"
        "from typing import TYPE_CHECKING\n"
        "try:\n    import torch\nexcept ImportError:\n    torch = None\n"
        "if TYPE_CHECKING:\n    import pymilvus\n"
        "else:\n    import services.search\n"
        "from .sibling import thing\n"
        "from mmsearch.common.v1 import types_pb2\n"
        "class C:\n    import json\n"
        "def f():\n    import mmsearch.suite\n"
    )
    found = {(imp.module, imp.module_level) for imp in imports_of("mmsearch/cli/x.py", source)}
    assert {("grpc", True), ("torch", True), ("pymilvus", False), ("services.search", True),
            ("mmsearch.cli.sibling", True), ("mmsearch.common.v1.types_pb2", True), ("json", True),
            ("mmsearch.suite", False)} <= found
    assert transport_or_store("grpc.aio") and transport_or_store("grpc_health.v1.health_pb2")
    assert transport_or_store("mmsearch.search.v1.search_pb2_grpc") and transport_or_store("pymilvus.exceptions")
    assert not transport_or_store("services.common.errors") and not transport_or_store("grpcx")
    # the real tree: the rules see the imports they are about
    assert any(imp.module.startswith("pymilvus") for imp in imports_of("services/search/milvus_store.py"))
    assert any(imp.module == "mmsearch.suite" and not imp.module_level for imp in imports_of("mmsearch/cli/main.py"))

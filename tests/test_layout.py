"""The package layout (docs/DESIGN.md, "Layout"): imports go one way, there are no cycles, and every package
imports on its own.

The import graph is read from the source (every ``import`` / ``from … import`` anywhere in a module, inside
functions too, and ``importlib.import_module("mwm.…")`` with a literal name), so a lazy back-import is caught
as well as a top-level one.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: A package may import only packages of a LOWER rank. Equal rank = siblings that never import each other: they
#: talk through files whose format is defined below them (the ROI manifest in rois/, encoder.pth + encoder.json
#: in engine/card). Data flow: read (data) → localize → rois → mask (masking) → pretrain (mim, train) → transfer
#: → bench.
RANK = {
    "mwm": 0, "errors": 0,          # the root package (__version__) and the error types
    "io": 1,                        # atomic writes, locks, hashes
    "config": 2,                    # YAML + overrides → pydantic configs
    "engine": 3,                    # runtime, schedules, seeding, EncoderCard: under pretraining and transfer
    "data": 4, "weights": 4,        # readers / transforms / paired augmentation; timm weight files
    "rois": 5,                      # the ROI manifest contract + ROI geometry + sources that need no model
    "masking": 6,                   # strategies (importance source × policy) → keep-masks
    "mim": 7,                       # sparse encoder, decoders, losses, MIM models
    "report": 8,                    # pictures and pages: a leaf that the stages above may use
    "localize": 9, "train": 9, "transfer": 9,  # the stages: VLM / model ROIs, pretraining, transfer
    "importance": 10,               # per-image importance maps (MedIM, Meijering) for the saliency strategies
    "bench": 11,                    # protocol runner over all stages
    "demo": 12,
    "cli": 13,
}

#: Back-imports that are known and scheduled to go (file, imported module) → why. The test fails when one of
#: them disappears, so the entry is deleted with the fix.
PENDING: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "mwm").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mwm"


def _targets(node: ast.AST, module: str, is_init: bool, modules: dict[str, Path]) -> list[str]:
    """The mwm modules one AST node imports."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_init else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            pkg = ".".join(base + ([node.module] if node.module else []))
        else:
            pkg = node.module or ""
        subs = [f"{pkg}.{a.name}" for a in node.names if f"{pkg}.{a.name}" in modules]
        names = subs if subs and len(subs) == len(node.names) else [pkg, *subs]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        names = [node.args[0].value]
    out = []
    for n in names:
        while n and n not in modules and "." in n:  # mwm.x.y.name → the module mwm.x.y
            n = n.rsplit(".", 1)[0]
        if n in modules and n != module:
            out.append(n)
    return out


def import_edges() -> list[tuple[str, int, str, str]]:
    """(file relative to src/, line, importing module, imported module) for every mwm → mwm import."""
    modules = _modules()
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            for target in _targets(node, module, path.name == "__init__.py", modules):
                edges.append((path.relative_to(SRC).as_posix(), node.lineno, module, target))
    return edges


def _package_cycles(edges) -> list[list[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for _, _, a, b in edges:
        if _package(a) != _package(b):
            graph[_package(a)].add(_package(b))
    cycles, state = [], {}

    def visit(v: str, stack: list[str]) -> None:
        state[v] = "open"
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w, stack + [w])
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    return cycles


def test_the_import_graph_sees_lazy_and_relative_imports():
    """The reader itself: a function-level relative import and a literal import_module are edges."""
    edges = {(f, a, b) for f, _, a, b in import_edges()}
    assert ("mwm/bench/runner.py", "mwm.bench.runner", "mwm.localize.gt_rois") in edges  # inside a function
    assert ("mwm/train/data.py", "mwm.train.data", "mwm.rois.manifest") in edges
    modules = _modules()
    call = ast.parse("importlib.import_module('mwm.report.plots')").body[0].value
    assert _targets(call, "mwm.rois.boxes", False, modules) == ["mwm.report.plots"]
    rel = ast.parse("from .. import train").body[0]
    assert _targets(rel, "mwm.bench.runner", False, modules) == ["mwm.train"]


def test_every_package_has_a_rank():
    missing = sorted({_package(m) for m in _modules()} - RANK.keys())
    assert not missing, (f"new package(s) {missing}: give each a rank in tests/test_layout.py RANK (what may it "
                         "import, who imports it?) and add it to docs/DESIGN.md 'Layout'")


def test_no_import_cycles_between_packages():
    cycles = _package_cycles(import_edges())
    assert not cycles, "package import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_imports_only_go_down():
    bad = []
    for f, line, a, b in import_edges():
        pa, pb = _package(a), _package(b)
        if pa == pb or (f, b) in PENDING or RANK.get(pb, 99) < RANK.get(pa, -1):
            continue
        how = "a sibling" if RANK.get(pa) == RANK.get(pb) else "a higher package"
        bad.append(f"{f}:{line}: {pa} (rank {RANK.get(pa)}) imports {b}, {how} (rank {RANK.get(pb)})")
    assert not bad, ("imports against the layout (a package imports only lower ranks; move the shared piece down, "
                     "see tests/test_layout.py RANK):\n" + "\n".join(bad))


def test_pending_back_imports_still_exist():
    seen = {(f, b) for f, _, _, b in import_edges()}
    gone = [f"{f} → {b} ({why})" for (f, b), why in PENDING.items() if (f, b) not in seen]
    assert not gone, "fixed, so delete from PENDING in tests/test_layout.py: " + "; ".join(gone)


_ISOLATED = textwrap.dedent("""
    import importlib, json, os, pkgutil, sys, traceback
    for lib in ("numpy", "torch", "pydantic", "scipy.ndimage", "PIL.Image", "yaml", "timm", "typer"):
        try:
            importlib.import_module(lib)  # third-party only: shared by the children, so each starts fast
        except Exception:
            pass
    assert not any(m == "mwm" or m.startswith("mwm.") for m in sys.modules)
    results = {}
    for pkg in sys.argv[1:]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a child with no mwm module loaded: import the package and every module in it
            os.close(r)
            err = ""
            try:
                mod = importlib.import_module(pkg)
                subs = getattr(mod, "__path__", []) if pkg != "mwm" else []  # the root: only itself
                for info in pkgutil.walk_packages(subs, pkg + "."):
                    importlib.import_module(info.name)
            except BaseException:
                err = traceback.format_exc(limit=3)
            os.write(w, err.encode())
            os._exit(0)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        os.waitpid(pid, 0)
        results[pkg] = b"".join(chunks).decode()
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def isolated_imports() -> dict[str, str]:
    """Package → traceback ('' when it imported): each package (all its modules) imported in a process that has
    no mwm module loaded (forked from one that loaded only third-party libraries, which is as fresh as a new
    interpreter for mwm and far faster)."""
    if not hasattr(__import__("os"), "fork"):
        pytest.skip("needs os.fork")
    pkgs = sorted({"mwm." + p if p != "mwm" else "mwm" for p in (_package(m) for m in _modules())})
    res = subprocess.run([sys.executable, "-c", _ISOLATED, *pkgs], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", sorted(RANK))
def test_each_package_imports_alone(isolated_imports, package):
    name = "mwm" if package == "mwm" else f"mwm.{package}"
    assert name in isolated_imports, f"{name}: not found under src/mwm"
    assert not isolated_imports[name], f"{name} fails to import on its own:\n{isolated_imports[name]}"


def test_old_module_paths_re_export_the_moved_objects():
    """Code written before rois/ (and running processes that import lazily) still finds every moved name, and it is
    the same object, not a copy that could drift."""
    import mwm.bench.config as bench_config
    import mwm.bench.runner as runner
    import mwm.localize.foreground as lf
    import mwm.localize.gt_rois as lg
    import mwm.localize.m2ib as lm
    import mwm.localize.manifest as lm_
    import mwm.localize.metrics as lmet
    import mwm.localize.perturb as lp
    import mwm.localize.pipeline as pipe
    import mwm.localize.postprocess as pp
    import mwm.report.overlays as ov
    import mwm.rois.boxes as rb
    import mwm.rois.foreground as rf
    import mwm.rois.gt_rois as rg
    import mwm.rois.manifest as rm
    import mwm.rois.perturb as rp
    import mwm.train.recon as recon

    for old, new in [(lm_, rm), (lp, rp), (lf, rf)]:
        assert all(getattr(old, n) is getattr(new, n) for n in old.__all__), old.__name__
    assert {n for n in lm_.__all__} >= {"read_manifest", "check_records", "usable_boxes", "has_roi", "ManifestError"}
    assert (lg.gt_rois, lg.with_fallback, lg.select) == (rg.gt_rois, rg.with_fallback, rg.select)
    assert all(getattr(pp, n) is getattr(rb, n) for n in ("mask_to_boxes", "expand_boxes", "boxes_to_mask",
                                                           "boxes_to_masks", "largest_components", "Components"))
    assert lmet.region_metrics is rb.region_metrics and lm.image_seed is rm.image_seed
    assert pipe.append_lines is rm.append_records and pipe.done_records is rm.done_records
    assert recon.vstack is ov.vstack and recon.MASKED_GRAY == ov.MASKED_GRAY
    assert runner.run_dir is bench_config.run_dir

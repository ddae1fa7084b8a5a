"""The import structure of simu_core: no import cycles, the layer table below, plotly only in
`figures`, Streamlit nowhere.

Read from the source with `ast` (nothing is imported), at module granularity: every import
counts, at the top of a file, inside a function or under `if TYPE_CHECKING`. `from simu_core
import x` and `from simu_core.x import y` go to the module `simu_core.x` (or to the package's
`__init__` when `x` / `y` is a name defined there); relative imports are resolved the same way.
Importing `simu_core.metrics.text` from outside `simu_core.metrics` also runs the package's
`__init__`, so it counts as importing both.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "simu_core"

# The layers, bottom (0) to top. A module imports only from strictly lower layers, or from its own
# layer when both are in the same subpackage (the modules of `metrics`, which keep their own order;
# the cycle test covers them). A new module gets a line here.
LAYERS = {
    # errors and settings
    "simu_core.errors": 0,
    "simu_core": 1,  # __version__, SimuError
    "simu_core.config": 1,
    "simu_core.answers": 1,  # free-form answer matching (text only)
    # data, model architectures, background jobs
    "simu_core.data": 2,
    "simu_core.arch": 2,
    "simu_core.jobs": 2,
    # converting GGUF files and obtaining SmolLM2 (called by models for .gguf and builtin:smollm2 specs)
    "simu_core.pretrained": 3,
    # loading models
    "simu_core.models": 4,
    # the built-in default (build and cache); per-neuron types (scores, masks, their files)
    "simu_core.builtin": 5,
    "simu_core.knowledge_facts": 0,  # plain fact tables
    "simu_core.knowledge": 5,  # the real-knowledge benchmark, built for a model
    "simu_core.neurons": 5,
    "simu_core.finetune": 6,  # the authors fine-tuned onto a pretrained model (uses builtin's training loop)
    "simu_core.pretrain": 7,  # the two-stage built-in: a small Llama pretrained here, then `finetune`
    "simu_core.distributed": 5,  # several processes: sharding and reductions through Accelerate
    "simu_core.targets": 5,  # attribution targets: the rows (value spans, subjects, matched items) of a data set
    # algorithms on a loaded model: attribution, masks, losses, the optimiser, the metrics
    "simu_core.attribution": 6,
    "simu_core.masks": 6,
    "simu_core.losses": 6,
    "simu_core.optim": 6,
    "simu_core.metrics": 6,
    "simu_core.metrics.text": 6,
    "simu_core.metrics.mia": 6,
    "simu_core.metrics.likelihood": 6,
    "simu_core.metrics.inputs": 6,
    "simu_core.metrics.registry": 6,
    "simu_core.metrics.suite": 6,
    "simu_core.metrics.results": 6,
    "simu_core.metrics.driver": 6,
    "simu_core.metrics.curve": 6,  # trade-off curve points and MUSE's checkpoint rule
    # the unlearning methods: trainable sets, registry, presets; does the model know the forget set
    # (before attribution/unlearning); the localisation check (ablate a mask against random masks)
    "simu_core.methods": 7,
    "simu_core.knowledge_check": 7,
    "simu_core.localise": 7,
    # the memory planner (reads the methods' trainable sets and presets)
    "simu_core.memory": 8,
    # unlearning (stage 2 and the baselines; checks the planner's estimate before it starts)
    "simu_core.unlearn": 9,
    # run folders
    "simu_core.runs": 10,
    # mode connectivity between models and runs; the relearning attack on a model or a run
    "simu_core.connectivity": 11,
    "simu_core.relearn": 11,
    # every plotly figure
    "simu_core.figures": 12,
    # the HTML evaluation report
    "simu_core.report": 13,
    # evaluating models and runs named by specs
    "simu_core.evaluation": 14,
    # the quality benchmark
    "simu_core.benchmark": 15,
    # the command line
    "simu_core.cli": 16,
    "simu_core.__main__": 17,
}
PLOTTING = ("plotly",)  # only simu_core.figures imports these
FORBIDDEN = ("streamlit",)  # simu_core never imports these


def module_names() -> dict[str, Path]:
    """Module name -> file for every .py file of simu_core (a package is named by its __init__)."""
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def package_of(name: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to: itself for a package's __init__, else its parent."""
    return name if is_package(name, modules) else name.rpartition(".")[0]


def imports(name: str, source: str, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(simu_core modules that the module `name` with this source imports, top-level names of the
    other packages it imports)."""
    tree = ast.parse(source)
    targets: set[str] = set()
    external: set[str] = set()

    def resolve(dotted: str) -> str | None:
        """The longest simu_core module that `dotted` names or lies in; None outside simu_core."""
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found = resolve(alias.name)
                if found:
                    targets.add(found)
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = package_of(name, modules).split(".")
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            if resolve(base) is None:
                external.add(base.split(".")[0])
                continue
            for alias in node.names:
                targets.add(resolve(f"{base}.{alias.name}"))
    # importing a submodule from outside its package runs the package's __init__ first
    for target in list(targets):
        parent = target.rpartition(".")[0]
        while parent in modules and parent != "simu_core" and not (name + ".").startswith(parent + "."):
            targets.add(parent)
            parent = parent.rpartition(".")[0]
    targets.discard(name)
    return targets, external


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = module_names()
    graph, external = {}, {}
    for name in modules:
        graph[name], external[name] = imports(name, modules[name].read_text(encoding="utf-8"), modules)
    return graph, external


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" when finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_simu_core_has_no_import_cycle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    modules = set(module_names())
    assert modules - set(LAYERS) == set(), "give the new module(s) a layer in LAYERS"
    assert set(LAYERS) - modules == set(), "LAYERS names module(s) that no longer exist"


def test_every_import_goes_to_a_lower_layer():
    modules = module_names()
    graph, _ = import_graph()
    wrong = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            same_package = package_of(name, modules) == package_of(target, modules) != "simu_core"
            if not (LAYERS[target] < LAYERS[name] or (LAYERS[target] == LAYERS[name] and same_package)):
                wrong.append(f"{name} (layer {LAYERS[name]}) imports {target} (layer {LAYERS[target]})")
    assert wrong == [], "imports against the layers:\n" + "\n".join(wrong)


def test_only_figures_imports_plotly_and_nothing_imports_streamlit():
    _, external = import_graph()
    plotting = sorted(
        name for name, libs in external.items() if set(libs) & set(PLOTTING) and name != "simu_core.figures"
    )
    assert plotting == [], f"plotly outside simu_core.figures: {plotting}"
    forbidden = sorted(name for name, libs in external.items() if set(libs) & set(FORBIDDEN))
    assert forbidden == [], f"simu_core must not import Streamlit: {forbidden}"
    assert "plotly" in external["simu_core.figures"]  # the check above reads the imports it should


def test_the_graph_reads_every_kind_of_import():
    """Imports inside functions and under TYPE_CHECKING, relative imports, `from package import module`
    and `from package import name` all count; other packages are told apart."""
    modules = module_names()
    source = """
import numpy as np
from simu_core import data as qa
from simu_core.metrics import EvalConfig
def later():
    from . import runs
    from .metrics.text import rouge_l_recall
    import simu_core.figures
if TYPE_CHECKING:
    from simu_core.neurons import NeuronMask
"""
    targets, external = imports("simu_core.unlearn", source, modules)
    expected = {"simu_core.data", "simu_core.metrics", "simu_core.runs", "simu_core.metrics.text"}
    assert targets == expected | {"simu_core.figures", "simu_core.neurons"}
    assert external == {"numpy"}
    inside, _ = imports(
        "simu_core.metrics.suite", "from simu_core.metrics.text import same_answer\nfrom . import mia", modules
    )
    assert inside == {"simu_core.metrics.text", "simu_core.metrics.mia"}  # no edge to its own package's __init__
    graph, _ = import_graph()
    assert "simu_core.unlearn" in graph["simu_core.runs"]  # inside run_unlearning
    assert "simu_core.metrics.suite" in graph["simu_core.metrics"]

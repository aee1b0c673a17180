"""The package's layers: every module belongs to one layer of `LAYERS`, and a module imports only
modules of its own layer or of layers below it. Every import counts, at module level or inside a
function (a lazy import still ties the two modules together); imports under TYPE_CHECKING do
not run and do not count (`test_layout.import_graph`).

A new module goes into the lowest layer its imports allow; an upward import is a design
decision, so it fails here until the import is removed or listed in `ALLOWED` with why."""

from __future__ import annotations

from test_layout import import_graph

# Bottom to top. An entry names a module or a package (then every module under it, unless a
# longer entry names that module): the longest matching entry decides a module's layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # no lorasum imports but each other: version, errors, atomic files, pure factored math, typed
    # JSON records
    (
        "core",
        (
            "lorasum._version",
            "lorasum.errors",
            "lorasum.io",
            "lorasum.logs",
            "lorasum.factors",
            "lorasum.training.low_memory",
            "lorasum.records",
        ),
    ),
    # the settings groups and TrainConfig: defaults, help and checks, defined once
    ("settings", ("lorasum.settings",)),
    # adapters on disk, data sources and their tokens, answers' accuracy math, DDP setup, the
    # results.json schema (the study writes it, the report and the forecast read it)
    (
        "files and data",
        (
            "lorasum.adapters",
            "lorasum.data",
            "lorasum.accuracy",
            "lorasum.training.distributed",
            "lorasum.training.lora_a",
            "lorasum.results_schema",
        ),
    ),
    ("models", ("lorasum.models",)),  # loading, precision (reads adapters' configs)
    ("evaluate", ("lorasum.evaluate",)),
    ("export", ("lorasum.export",)),  # GGUF and merged files (compose writes them)
    ("methods", ("lorasum.methods",)),  # merge methods: pure functions over one module's terms
    # analysis, in four steps: statistics and input statistics, the predictor families, the
    # forecast from studies (ranks the registered predictors), `lorasum predict`
    (
        "analysis: statistics",
        (
            "lorasum.analysis.statistics",
            "lorasum.analysis.similarity",
            "lorasum.analysis.calibration",
            "lorasum.analysis.gradients",
        ),
    ),
    ("analysis: predictors", ("lorasum.analysis.predictors",)),
    ("analysis: forecast", ("lorasum.analysis.forecast",)),
    ("analysis: predict", ("lorasum.analysis.predict", "lorasum.analysis")),
    ("compose", ("lorasum.compose", "lorasum.peft_live")),  # calibrates its calibration methods
    ("training and routing", ("lorasum.training", "lorasum.routing", "lorasum.merge_aware")),
    ("report", ("lorasum.report",)),  # reads results.json only; the study writes it at the end
    ("study", ("lorasum.study",)),
    ("api and cli", ("lorasum", "lorasum.cli", "lorasum.__main__")),
]

# (importer, imported) pairs allowed to go upward, each with why. None today.
ALLOWED: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> int | None:
    """Index in `LAYERS` of the longest entry that is ``module`` or a package above it (the
    package root ``lorasum`` only for itself: every module needs a layer of its own)."""
    best, found = -1, None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            above = entry != "lorasum" and module.startswith(entry + ".")
            if (module == entry or above) and len(entry) > best:
                best, found = len(entry), i
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module in a higher layer than the importer's, as readable lines."""
    out = []
    for module, deps in sorted(graph.items()):
        own = layer_of(module)
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if own is None or theirs is None or theirs <= own or (module, dep) in ALLOWED:
                continue
            out.append(f"{module} ({LAYERS[own][0]}) imports {dep} ({LAYERS[theirs][0]})")
    return out


def test_every_module_has_a_layer():
    graph = import_graph()
    assert len(graph) > 30
    assert [m for m in sorted(graph) if layer_of(m) is None] == []


def test_no_module_imports_upward():
    assert upward_imports(import_graph()) == []


def test_allowed_exceptions_are_still_needed():
    graph = import_graph()
    stale = [pair for pair in ALLOWED if pair[1] not in graph.get(pair[0], set())]
    assert stale == []


def test_nothing_below_the_study_imports_it():
    study = layer_of("lorasum.study")
    below = [
        f"{m} imports {d}"
        for m, deps in import_graph().items()
        if layer_of(m) < study
        for d in deps
        if d == "lorasum.study" or d.startswith("lorasum.study.")
    ]
    assert below == []


def test_the_checker_finds_planted_upward_imports():
    graph = {
        "lorasum.methods.svd": {"lorasum.factors"},  # down: fine
        "lorasum.analysis.predictors.weight": {"lorasum.analysis.forecast"},  # up inside analysis
        "lorasum.analysis.forecast": {"lorasum.study.results"},  # up into the study
        "lorasum.compose": {"lorasum.peft_live"},  # same layer: fine
    }
    assert upward_imports(graph) == [
        "lorasum.analysis.forecast (analysis: forecast) imports lorasum.study.results (study)",
        "lorasum.analysis.predictors.weight (analysis: predictors) imports "
        "lorasum.analysis.forecast (analysis: forecast)",
    ]
    assert layer_of("lorasum.analysis") == layer_of("lorasum.analysis.predict")
    assert layer_of("lorasum.analysis.predictors.registry") == layer_of(
        "lorasum.analysis.predictors"
    )
    assert layer_of("lorasum") != layer_of("lorasum.compose")
    assert layer_of("lorasum.new_module") is None  # not placed yet: test_every_module_has_a_layer
    assert layer_of("somewhere.else") is None

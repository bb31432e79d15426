"""The package layout (issue 20): the import rules each package's __init__ states, and documentation
whose commands cannot rot.

Imports are read with `ast`, not by importing, so a rule is checked for code paths no test runs
(imports inside functions count) and the check takes well under a second.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mgpt", "data_prep", "configs")
# The commands users run, and the modules that are theirs alone: no library module imports them.
COMMANDS = ("mgpt.generate", "mgpt.evaluate", "mgpt.train.__main__", "mgpt.aot.__main__", "mgpt.aot",
            "mgpt.live.__main__")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The most specific module of ours that importing `name` runs (`mgpt.x.y` for a name y in
    module mgpt.x is mgpt.x), or None for a third-party module."""
    modules = _modules()
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


@functools.cache
def _imports() -> dict[str, frozenset[str]]:
    """module -> the modules of ours it imports anywhere in its source (top level or in functions)."""
    graph = {}
    for name, path in _modules().items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(_resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from mgpt.train import loop` imports the module mgpt.train.loop, not just the package.
                found.update(_resolve(f"{node.module}.{a.name}") for a in node.names)
        found.discard(None)
        found.discard(name)
        graph[name] = frozenset(found)
    return graph


def _violations(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return sorted(f"{m} imports {d}" for m, deps in _imports().items() if under(m, importers)
                  for d in deps if any(under(d, f) for f in forbidden))


def test_the_graph_sees_every_package_and_its_imports():
    # Guards the rules below against passing vacuously: a parser that found nothing would pass them all.
    graph = _imports()
    assert {"mgpt.model.gpt", "mgpt.train.loop", "mgpt.sample.sampler", "mgpt.music.features",
            "mgpt.eval.report"} <= set(graph)
    assert "mgpt.model.gpt" in graph["mgpt.sample.sampler"]
    assert "mgpt.train.checkpoint" in graph["mgpt.train.loop"]
    assert "mgpt.train.checkpoint" in graph["mgpt.sample.run"]  # an import inside a function counts


def test_model_imports_no_training_sampling_or_evaluation():
    assert _violations("mgpt.model", ("mgpt.train", "mgpt.sample", "mgpt.eval", *COMMANDS)) == []


def test_music_analysis_imports_no_model_code():
    assert _violations("mgpt.music", ("mgpt.model", "mgpt.sample", "mgpt.eval", *COMMANDS)) == []


def test_eval_imports_no_training_code():
    assert _violations("mgpt.eval", ("mgpt.train.loop", "mgpt.train.aot", "mgpt.train.__main__")) == []


def test_live_imports_only_the_sampler_rendering_and_errors():
    assert _violations("mgpt.live", ("mgpt.train", "mgpt.eval", "mgpt.music", "mgpt.generate", "mgpt.evaluate",
                                     "mgpt.aot")) == []


def test_no_module_imports_a_command():
    # `from mgpt.generate import load_run` stays for notebooks; our own code imports the library.
    graph = _imports()
    bad = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                 if d in COMMANDS and not (m, d) == ("mgpt.aot.__main__", "mgpt.aot"))
    assert bad == []


@pytest.mark.parametrize("command, allowed", [
    ("mgpt.train.__main__", ("mgpt.train", "mgpt.errors")),
    ("mgpt.aot.__main__", ("mgpt.aot", "mgpt.train.aot")),
    # mesh: only jax.distributed's start-up on a pod, shared with training.
    ("mgpt.generate", ("mgpt.sample", "mgpt.render", "mgpt.errors", "mgpt.train.mesh")),
    ("mgpt.evaluate", ("mgpt.eval", "mgpt.sample.run", "mgpt.sample.corpus", "mgpt.render", "mgpt.errors")),
])
def test_entry_points_import_only_their_package(command, allowed):
    deps = _imports()[command]
    assert deps, f"{command}: no imports found"
    assert sorted(d for d in deps if not any(d == a or d.startswith(a + ".") for a in allowed)) == []


def test_no_import_cycles():
    graph = _imports()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_every_package_init_says_what_lives_there():
    for name, path in _modules().items():
        if path.name == "__init__.py" and name.startswith("mgpt"):
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc.split()) >= 20, f"{path}: the docstring should say what lives here"
            if name != "mgpt":
                assert "import" in doc, f"{path}: the docstring should say what this package may import"


# ----------------------------------------------------------------------------- documented commands

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Where a command's flags are defined, when not in its own file.
FLAG_SOURCES = {"mgpt.aot": ["mgpt/train/aot.py"], "mgpt.generate": ["mgpt/sample/run.py"],
                "mgpt.evaluate": ["mgpt/sample/run.py"]}
ABSL_FLAGS = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok"}


def _commands(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, arguments) of every `python -m MODULE ...` line in the file's fenced code blocks."""
    found, block, in_fence = [], [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            if in_fence:
                text = "\n".join(block).replace("\\\n", " ")
                for cmd in text.splitlines():
                    m = re.search(r"python3?(?:\.\d+)? -m ([\w.]+)(.*)", cmd)
                    if m:
                        args = re.split(r"\s(?:#|\||&&|;|>)", " " + m.group(2))[0]
                        found.append((m.group(1), shlex.split(args)))
                block = []
            in_fence = not in_fence
        elif in_fence:
            block.append(line)
    return found


def _module_file(module: str) -> pathlib.Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _flags_of(module: str) -> frozenset[str]:
    """Flag names the command defines (absl DEFINE_* calls), read from its source."""
    files = [_module_file(module)] + [ROOT / f for f in FLAG_SOURCES.get(module, [])]
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
                    and getattr(node.func, "attr", getattr(node.func, "id", "")).startswith("DEFINE")
                    and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
    return frozenset(names)


@functools.cache
def _config(spec: str):
    """configs/x.py[:arg] -> its ConfigDict, loaded as --config would load it."""
    path, _, arg = spec.partition(":")
    loader = importlib.util.spec_from_file_location(f"_doc_config_{pathlib.Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _documented() -> list[tuple[str, str, list[str]]]:
    cmds = [(p.relative_to(ROOT).as_posix(), m, a) for p in DOCS for m, a in _commands(p)]
    return [(where, m, a) for where, m, a in cmds if m.split(".")[0] in ("mgpt", "data_prep")]


def test_docs_show_the_commands_of_every_stage():
    modules = {m for _, m, _ in _documented()}
    assert {"data_prep.build", "mgpt.train", "mgpt.generate", "mgpt.evaluate", "mgpt.aot"} <= modules


def test_flag_reader_agrees_with_absl():
    # The source reader below must see exactly what the command defines.
    from absl import flags

    from mgpt import generate

    fv = flags.FlagValues()
    generate.define_flags(fv)
    assert _flags_of("mgpt.generate") == frozenset(fv)


def test_every_documented_command_names_flags_that_exist():
    problems = []
    for where, module, args in _documented():
        if _module_file(module) is None:
            problems.append(f"{where}: python -m {module}: no such module")
            continue
        known = _flags_of(module) | ABSL_FLAGS
        config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
        for arg in args:
            if not arg.startswith("--"):
                continue
            name = arg[2:].split("=", 1)[0]
            if name.startswith("config.") and "config" in known:
                if config is None:
                    problems.append(f"{where}: {arg} without --config=")
                    continue
                node = _config(config)
                for field in name.split(".")[1:]:
                    if not hasattr(node, "keys") or field not in node:
                        problems.append(f"{where}: python -m {module} {arg}: {config} has no field {name[7:]!r}")
                        break
                    node = node[field]
            elif name not in known and not (name.startswith("no") and name[2:] in known):
                problems.append(f"{where}: python -m {module} {arg}: no such flag")
    assert problems == []


# ----------------------------------------------------------------------------- old import paths


def test_old_import_paths_that_notebooks_use_still_work():
    from mgpt import aot, train
    from mgpt.generate import Run, Sampling, generate_corpus, load_run
    from mgpt.model import GPT, ModelConfig
    from mgpt.sample import generate_tokens, sampling_settings
    from mgpt.sample import run as run_lib
    from mgpt.sample import corpus, sampler
    from mgpt.train import aot as aot_lib
    from mgpt.train import loop

    assert (Run, Sampling, load_run) == (run_lib.Run, run_lib.Sampling, run_lib.load_run)
    assert generate_corpus is corpus.generate_corpus
    assert (generate_tokens, sampling_settings) == (sampler.generate_tokens, sampler.sampling_settings)
    assert (train.train, train.make_train_step) == (loop.train, loop.make_train_step)
    assert aot.parse_topology is aot_lib.parse_topology
    assert GPT.__module__ == "mgpt.model.gpt" and ModelConfig.__module__ == "mgpt.model.gpt"
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        train.no_such_name
    # The flat package's modules, by their old names.
    from mgpt import checkpoint, features, models, ngram

    assert (checkpoint.restore_model, features.FEATURES) == (
        importlib.import_module("mgpt.train.checkpoint").restore_model, importlib.import_module("mgpt.music.features").FEATURES)
    assert models.KINDS["gpt"][1] is GPT and ngram.__name__ == "mgpt.music.ngram"

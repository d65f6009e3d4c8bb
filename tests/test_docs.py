"""The manual stays true to the code, read as a new user reads it.

- Every `python -m <module> ...` command of this repository's modules that the README, docs/*.md,
  benchmarks/*.md and the comments of sweeps/*.yaml show (in bash blocks, in inline code, in comment
  lines) parses its flags with the module's own argparse. Nothing runs: `main(argv)` is called with
  ArgumentParser.parse_args and parse_known_args wrapped so that a successful parse stops there
  (Parsed). A bad flag is argparse's SystemExit(2). Placeholders (SPEC, CKPT, N, `...`, `[--json]`)
  are filled in first (PLACEHOLDERS).
- Every repository path they name exists, unless git ignores it (an output of the pipeline:
  reports/, results/, data/, ...).
- Every link to a file and every `#section` resolves, the section by GitHub's heading slugs, and
  every section cited by name (`docs/cluster.md, "Sweeps on a GPU cluster"`) exists.

Each check also runs on a small synthetic doc with a stale flag, path, anchor and citation, so that
it is seen to fail where it should. About the time of importing the modules (seconds); no Ray.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# This repository's importable top-level packages: `python -m` of anything else (pytest, venv, mlflow)
# is another project's command and is not checked here.
OWN_PACKAGES = ("vpn", "pipeline", "benchmarks")
# Placeholders the docs use for a value, and a value of the right kind for each.
PLACEHOLDERS = {
    "SPEC": "sweeps/depth_width.yaml",
    "SPEC_OR_NAME": "depth_width",
    "P": "cpu",
    "CKPT": "runs/best/extra_files/checkpoint.pt",
    "N": "1",
    "T": "1.0",
    "S": "0",
    "DIR": "data/moving_mnist",
}
SHELL_BREAKS = re.compile(r"\s*(?:&&|\|\||;|\|(?!\|)|\s&\s*$|\d?>>?\s*\S+)\s*")
PATH_TOKEN = re.compile(r"(?:\./)?(?:[\w.-]+/)+[\w.-]*|[\w.-]+\.(?:py|md|yaml|yml|toml|json|lock|sbatch|cfg|txt)")
MD_LINK = re.compile(r"\[(?:[^\]]|\][^(])*\]\(([^)\s]+)\)")
CITATION = re.compile(
    r"(README(?:\.md)?|(?:[\w.-]+/)*[\w.-]+\.md)(?:,| section| ?:)?\s+\"([^\"]+)\"|README section \"([^\"]+)\""
)


def doc_files(root: Path = REPO) -> list[Path]:
    """The manual: README, docs/, the benchmarks' pages, and the sweep specs and cluster configs."""
    return [
        root / "README.md",
        *sorted((root / "docs").glob("*.md")),
        *sorted((root / "benchmarks").glob("*.md")),
        *sorted((root / "sweeps").glob("*.yaml")),
    ]


# -- reading a doc ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snippet:
    """Text a reader would type or follow: a bash block's logical line, an inline code span, a YAML
    comment; `code` tells a shell line (bash block, comment) from an inline span."""

    line: int
    text: str
    code: bool


def _fences(lines: list[str]) -> Iterator[tuple[int, str, str | None]]:
    """(line number, line, the enclosing fence's language or None outside any fence); fence lines left out."""
    lang: str | None = None
    for number, line in enumerate(lines, start=1):
        fence = re.match(r"\s*(```|~~~)\s*(\S*)", line)
        if fence:
            lang = None if lang is not None else fence.group(2)
            continue
        yield number, line, lang


def snippets(path: Path, text: str) -> list[Snippet]:
    """What a doc shows to be typed: bash blocks (continued lines joined), inline code spans (which
    may wrap across lines), and for YAML every comment line."""
    lines = text.splitlines()
    if path.suffix in (".yaml", ".yml"):
        return [Snippet(n, line.split("#", 1)[1], True) for n, line in enumerate(lines, 1) if "#" in line]
    out: list[Snippet] = []
    held: tuple[int, str] | None = None  # a bash line continued with a backslash
    prose: list[tuple[int, str]] = []
    for number, line, lang in _fences(lines):
        if lang is None:
            prose.append((number, line))
            continue
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        start, body = held if held else (number, "")
        body += line.rstrip()
        if body.endswith("\\"):
            held = (start, body[:-1] + " ")
            continue
        held = None
        out.append(Snippet(start, body, True))
    out += _spans(prose)
    return out


def _spans(prose: list[tuple[int, str]]) -> list[Snippet]:
    """Inline code spans of the prose, each at the line it starts on."""
    text = "\n".join(line for _, line in prose)
    starts = [0]
    for _, line in prose:
        starts.append(starts[-1] + len(line) + 1)
    spans = []
    for m in re.finditer(r"(`+)(.+?)\1", text, flags=re.DOTALL):
        index = sum(1 for s in starts[1:] if s <= m.start())
        spans.append(Snippet(prose[index][0] if prose else 0, m.group(2).replace("\n", " ").strip(), False))
    return spans


def headings(text: str) -> set[str]:
    """The anchors GitHub gives a markdown file's headings (duplicates: -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for _, line, lang in _fences(text.splitlines()):
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line) if lang is None else None
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        anchors.add(base if n == 0 else f"{base}-{n}")
    return anchors


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text as rendered (code marks and link targets gone), lower
    case, every character but letters, digits, `_`, `-` and spaces dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


# -- commands -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    where: str  # "docs/x.md:12"
    module: str
    args: tuple[str, ...]
    mention: bool  # an inline `python -m module` with no arguments: names the module, runs nothing


def commands(where: str, snippet: Snippet) -> list[Command]:
    """Each `python -m <own module> ...` in a snippet, cut at the shell's separators and a comment."""
    text = snippet.text
    if snippet.code:
        text = re.split(r"\s#", text, maxsplit=1)[0]  # a trailing comment (a URL's # has no space before it)
    found = []
    for part in SHELL_BREAKS.split(text):
        m = re.search(r"\bpython3? -m ([\w.]+)(.*)", part)
        if not m or m.group(1).split(".")[0] not in OWN_PACKAGES:
            continue
        try:
            tokens = shlex.split(m.group(2).strip().rstrip(")"))
        except ValueError:  # an unbalanced quote: prose, not a command
            continue
        if "/" in tokens:  # "python -m vpn info / train / eval": a list of subcommands
            tokens = []
        found.append(Command(where, m.group(1), tuple(tokens), mention=not tokens and not snippet.code))
    return found


def fill(args: tuple[str, ...]) -> list[list[str]]:
    """The argv a documented command stands for: optional groups unbracketed, placeholders filled; an
    elided `...` either dropped or taken as a value (the parse is accepted if either parses)."""
    plain = [a.strip("[]") for a in args if a.strip("[]")]
    plain = [PLACEHOLDERS.get(a, a) for a in plain]
    if "..." not in plain:
        return [plain]
    return [[a for a in plain if a != "..."], ["x" if a == "..." else a for a in plain]]


class Parsed(Exception):
    """The command's arguments parsed: stop before anything runs."""


@contextlib.contextmanager
def parse_only() -> Iterator[None]:
    """ArgumentParser.parse_args and parse_known_args that raise Parsed once the outermost parse has
    succeeded; a subcommand's own parse (argparse calls it inside the outer one) returns as usual."""
    real = argparse.ArgumentParser.parse_known_args
    depth = 0

    def known(self, args=None, namespace=None):
        nonlocal depth
        depth += 1
        try:
            result = real(self, args, namespace)
        finally:
            depth -= 1
        if depth == 0:
            raise Parsed(result)
        return result

    def parse(self, args=None, namespace=None):
        nonlocal depth
        depth += 1
        try:
            namespace, extras = real(self, args, namespace)
        finally:
            depth -= 1
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise Parsed(namespace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", known)
        patch.setattr(argparse.ArgumentParser, "parse_args", parse)
        yield


def main_of(module: str):
    """The function `python -m module` runs: the module's main, or for a package the main its
    __main__.py imports (read, not run: __main__ calls it at import); None where there is none."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"no module {module}")
    if spec.submodule_search_locations:  # a package: what its __main__ imports as main
        main_file = Path(next(iter(spec.submodule_search_locations))) / "__main__.py"
        if not main_file.is_file():
            raise ModuleNotFoundError(f"{module} is a package without __main__.py")
        for node in ast.walk(ast.parse(main_file.read_text())):
            if isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names):
                return importlib.import_module(node.module).main
        return None
    return getattr(importlib.import_module(module), "main", None)


def parse_problem(command: Command) -> str | None:
    """Why a documented command does not parse (None: it does, or its module has no main)."""
    try:
        main = main_of(command.module)
    except ModuleNotFoundError as e:
        return f"{command.where}: python -m {command.module}: {e}"
    if main is None or command.mention:
        return None
    errors = []
    for argv in fill(command.args):
        stderr = io.StringIO()
        try:
            with parse_only(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                if inspect.signature(main).parameters:
                    status = main(argv)
                else:  # a main that reads sys.argv
                    with pytest.MonkeyPatch.context() as patch:
                        patch.setattr(sys, "argv", [command.module, *argv])
                        status = main()
        except Parsed:
            return None
        except SystemExit as e:
            status = e.code
        # Here the parse failed: argparse exited, or a main that catches its SystemExit returned the status.
        if status in (0, None):  # --help
            return None
        said = stderr.getvalue().strip()
        errors.append(said.splitlines()[-1] if said else f"exit status {status}")
    shown = " ".join(command.args)
    return f"{command.where}: `python -m {command.module} {shown}`: {errors[-1]}"


# -- paths, links, citations ---------------------------------------------------------------------------
def top_level(root: Path) -> set[str]:
    """The repository's top-level entries (a path is taken for a repository path when it starts with one)."""
    return {p.name for p in root.iterdir() if p.name != ".git"}


def ignored(root: Path, paths: list[str]) -> set[str]:
    """The paths git ignores (outputs of the pipeline); none outside a git repository."""
    if not paths:
        return set()
    run = subprocess.run(
        ["git", "-C", str(root), "check-ignore", "--stdin"],
        input="\n".join(paths), capture_output=True, text=True, check=False,
    )  # fmt: skip
    return set(run.stdout.splitlines()) if run.returncode in (0, 1) else set()


def named_paths(snippet: Snippet, tops: set[str]) -> list[str]:
    """The repository paths a snippet names: tokens that start with a top-level entry of the
    repository, without a test id (::name), a line number (:12) or trailing punctuation."""
    found = []
    for m in PATH_TOKEN.finditer(snippet.text):
        token = m.group(0).removeprefix("./").rstrip(".,:;")
        before = snippet.text[max(0, m.start() - 1) : m.start()]
        after = snippet.text[m.end() : m.end() + 1]
        if before in ("/", "~", "$", ":", "<", "{", "@", "-", "=") or after in ("<", "{", "*", "$", "@"):
            continue  # part of an absolute path, a URL, a placeholder, a glob or another repo's name
        if token.split("/")[0] in tops and token not in found:
            found.append(token)
    return found


def path_problems(root: Path, doc: Path, text: str) -> list[str]:
    """Repository paths the doc names that do not exist (outputs git ignores left aside)."""
    tops = top_level(root)
    named = [(s.line, p) for s in snippets(doc, text) if s.code or "/" in s.text or "." in s.text
             for p in named_paths(s, tops)]  # fmt: skip
    missing = [(line, p) for line, p in named if not (root / p).exists()]
    outputs = ignored(root, [p for _, p in missing])
    return [f"{rel(doc, root)}:{line}: `{p}` does not exist" for line, p in missing if p not in outputs]


def link_problems(root: Path, doc: Path, text: str) -> list[str]:
    """Markdown links to a file that does not exist or to a #section its target does not have."""
    if doc.suffix != ".md":
        return []
    problems = []
    for number, line, lang in _fences(text.splitlines()):
        if lang is not None:
            continue
        for target in MD_LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z]+:", target):  # http:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            where = f"{rel(doc, root)}:{number}"
            if not path.exists():
                if file and rel(path, root) not in ignored(root, [rel(path, root)]):
                    problems.append(f"{where}: link to {target}: no file {rel(path, root)}")
                continue
            if anchor and path.suffix == ".md" and anchor not in headings(path.read_text()):
                problems.append(f"{where}: link to {target}: {rel(path, root)} has no section #{anchor}")
    return problems


def citation_problems(root: Path, doc: Path, text: str) -> list[str]:
    """Sections cited by name (`docs/x.md, "A heading"`, `the README section "A heading"`) that the
    cited file does not have; a citation may name a heading by its first words ("Sharing the data")."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        for m in CITATION.finditer(line):
            file, heading = (m.group(1), m.group(2)) if m.group(1) else ("README.md", m.group(3))
            file = "README.md" if file == "README" else file
            path = root / file if (root / file).exists() else doc.parent / file
            if not path.exists():
                problems.append(f"{rel(doc, root)}:{number}: cites {file}, which does not exist")
            elif not any(a == slug(heading) or a.startswith(slug(heading) + "-") for a in headings(path.read_text())):
                problems.append(f'{rel(doc, root)}:{number}: cites {file}, "{heading}": no such section')
    return problems


# The values in a cluster config that every user must replace: its header says each line holding one
# is marked EDIT (on the line, or in the comment lines just above the list item or key it belongs to).
PLACEHOLDER_VALUES = {"sweeps/cluster.yaml": ("my-vpn-sweeps", "123456789012")}


def unmarked_placeholders(text: str, values: tuple[str, ...]) -> list[int]:
    """Lines (1-based) holding one of `values` with no EDIT on them or just above their item."""
    lines = text.splitlines()
    unmarked = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#") or not any(v in line for v in values) or "EDIT" in line:
            continue
        item = i  # the list item or key the line belongs to (a folded command spans lines)
        while item > 0 and not re.match(r"\s*(- |[\w.-]+:)", lines[item]):
            item -= 1
        above = item - 1
        marked = False
        while above >= 0 and lines[above].lstrip().startswith("#"):
            marked |= "EDIT" in lines[above]
            above -= 1
        if not marked:
            unmarked.append(i + 1)
    return unmarked


def rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# -- the tests ------------------------------------------------------------------------------------------
def documented_commands(root: Path = REPO) -> list[Command]:
    found = []
    for doc in doc_files(root):
        for s in snippets(doc, doc.read_text()):
            found += commands(f"{rel(doc, root)}:{s.line}", s)
    return found


def test_every_documented_command_parses_its_flags():
    found = documented_commands()
    assert len([c for c in found if not c.mention]) >= 40, "the docs' commands were not found"  # 71 today
    problems = [p for c in found if (p := parse_problem(c))]
    assert not problems, "\n".join(problems)


def test_every_named_path_exists_and_every_link_and_cited_section_resolves():
    problems = []
    for doc in doc_files():
        text = doc.read_text()
        problems += path_problems(REPO, doc, text) + link_problems(REPO, doc, text)
        problems += citation_problems(REPO, doc, text)
    assert not problems, "\n".join(problems)


def test_every_placeholder_of_the_cluster_configs_is_marked_edit():
    for name, values in PLACEHOLDER_VALUES.items():
        assert unmarked_placeholders((REPO / name).read_text(), values) == [], name
    stale = "a:\n  # EDIT: the bucket below\n  - >-\n    x s3://b\n  - y s3://b\nb: s3://b   # EDIT\n"
    assert unmarked_placeholders(stale, ("s3://b",)) == [5]


def test_github_heading_slugs():
    text = "# A\n\n## `ray job submit` keeps its results\n\n```\n# not a heading\n```\n\n## A\n\n### x: y, z (1)\n"
    assert headings(text) == {"a", "ray-job-submit-keeps-its-results", "a-1", "x-y-z-1"}
    assert slug("The sweep in MLflow: one parent run, its trials nested") == (
        "the-sweep-in-mlflow-one-parent-run-its-trials-nested"
    )
    assert slug("[The paper's](x.md) finding at 32x32") == "the-papers-finding-at-32x32"


def test_each_check_fails_on_a_stale_doc(tmp_path):
    """A synthetic repository whose doc has a stale flag, a missing path, a broken anchor and a
    citation of a section that is gone, beside the true ones: each check names exactly the stale one."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "real.py").write_text("")
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A section\n")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text(
        "# Page\n\n## Here\n\n"
        "```bash\n"
        "python -m pipeline.report --params params.yaml\n"
        "python -m pipeline.report --params params.yaml \\\n    --no-such-flag\n"
        "python -m pipeline.sweep SPEC --profile P --plan [--json]   # placeholders\n"
        "```\n\n"
        "See `pipeline/real.py`, `pipeline/gone.py`, [there](other.md#a-section), [here](#here),\n"
        "[nowhere](#no-such-section), [gone](other.md#gone), [no file](missing.md), and\n"
        'docs/other.md, "A section", docs/other.md, "A", and docs/other.md, "A section that was renamed".\n'
        "Also `python -m vpn info --preset micro --json` and `python -m vpn info --no-such-option`.\n"
    )
    text = doc.read_text()
    found = [c for s in snippets(doc, text) for c in commands(f"docs/page.md:{s.line}", s)]
    assert [(c.module, c.where) for c in found] == [
        ("pipeline.report", "docs/page.md:6"), ("pipeline.report", "docs/page.md:7"),
        ("pipeline.sweep", "docs/page.md:9"), ("vpn", "docs/page.md:15"), ("vpn", "docs/page.md:15"),
    ]  # fmt: skip
    problems = [p for c in found if (p := parse_problem(c))]
    assert len(problems) == 2, problems
    assert "docs/page.md:7:" in problems[0] and "unrecognized arguments: --no-such-flag" in problems[0]
    assert "--no-such-option" in problems[1]
    assert path_problems(tmp_path, doc, text) == ["docs/page.md:12: `pipeline/gone.py` does not exist"]
    assert link_problems(tmp_path, doc, text) == [
        "docs/page.md:13: link to #no-such-section: docs/page.md has no section #no-such-section",
        "docs/page.md:13: link to other.md#gone: docs/other.md has no section #gone",
        "docs/page.md:13: link to missing.md: no file docs/missing.md",
    ]
    assert citation_problems(tmp_path, doc, text) == [
        'docs/page.md:14: cites docs/other.md, "A section that was renamed": no such section'
    ]
    # a YAML spec's comments: commands and paths in them are checked the same way
    spec = tmp_path / "spec.yaml"
    spec.write_text("# python -m pipeline.sweep sweeps/x.yaml --prfile cpu   # a typo\n# see pipeline/gone.py\na: 1\n")
    (yaml_command,) = [c for s in snippets(spec, spec.read_text()) for c in commands("spec.yaml:1", s)]
    assert "unrecognized arguments: --prfile" in parse_problem(yaml_command)
    assert path_problems(tmp_path, spec, spec.read_text()) == ["spec.yaml:2: `pipeline/gone.py` does not exist"]

"""The repository stands on its own: no reference outside it, its test data shipped with a provenance note, CI
(`.ci/run`) running the README's test command in a fresh clone with nothing beside it, and docs that a user can
follow: a short README, links that resolve, no lab-notebook narrative."""

import os
import re
import shutil
import subprocess
from pathlib import Path

from visdial_data import VISDIAL_DATA_DIR

REPO = Path(__file__).resolve().parents[1]

# What the project once used to reach data beside the checkout; none of it may come back.
OUTSIDE_REFERENCES = re.compile(r"\.\./shared|OMNIFUSION_SHARED|/work/shared|[\"']shared[\"']\s*/")


def _project_files() -> list[Path]:
    """Every file git tracks (or, outside a git checkout, every file but hidden and build folders)."""
    if shutil.which("git") and (REPO / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        return [REPO / name for name in listed.decode().split("\0") if name]
    return [
        path
        for path in REPO.rglob("*")
        if path.is_file()
        and not any(
            part.startswith(".") or part in ("build", "dist", "__pycache__")
            for part in path.parts[len(REPO.parts) : -1]
        )
    ]


def test_no_file_refers_to_data_outside_the_repository():
    offenders = []
    for path in _project_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_REFERENCES.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "references to data outside the repository:\n" + "\n".join(offenders)


def test_visdial_sample_is_shipped_with_its_provenance():
    provenance = (VISDIAL_DATA_DIR / "PROVENANCE.md").read_text()
    assert "CC BY 4.0" in provenance and "visualdialog.org" in provenance and "visdial_conv" in provenance
    data_files = sorted(path.name for path in VISDIAL_DATA_DIR.glob("*.json"))
    assert data_files == [
        "visdial_1.0_val_crowdsourced.json",
        "visdial_1.0_val_dense_annotations_crowdsourced.json",
        "visdial_1.0_val_dense_annotations_sample5.json",
        "visdial_1.0_val_sample5.json",
    ]
    for name in data_files:
        assert f"`{name}`" in provenance, f"{name} is not described in PROVENANCE.md"


def _readme_command(title: str) -> str:
    """The one-line command in the first ```bash block after the README paragraph starting with `title`."""
    readme = (REPO / "README.md").read_text()
    block = re.search(re.escape(title) + r".*?```bash\n(.*?)\n```", readme, re.S)
    assert block, f"README has no command block after {title!r}"
    return block.group(1).strip()


def test_ci_main_tier_is_the_readme_test_command_verbatim():
    command = _readme_command("**Tests**")
    assert command.endswith("HF_HUB_OFFLINE=1 pytest -q") and 'pip install ".[test]"' in command
    tier = (REPO / ".ci" / "tier_main.sh").read_text().splitlines()
    assert command in tier
    assert re.search(r"^tier main$", (REPO / ".ci" / "run").read_text(), re.M)
    assert command in (REPO / "tests" / "README.md").read_text()


def test_readme_demo_command_installs_train_eval_and_runs_the_quickstart():
    command = _readme_command("**Demo**")
    assert command == (
        "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
        'pip install ".[train,eval]" && python examples/quickstart.py'
    )


# The pages a user reads: the front door, the docs, and every folder's README (the metric card included).
def _doc_pages() -> list[Path]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    pages += sorted(path for path in _project_files() if path.name == "README.md" and path not in pages)
    return [page for page in pages if page.is_file()]


def test_readme_is_at_most_200_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_docs_pages_exist():
    names = {page.name for page in (REPO / "docs").glob("*.md")}
    expected = {
        "usage.md",
        "architecture.md",
        "training.md",
        "conversion.md",
        "serving.md",
        "evaluation.md",
        "reliability.md",
        "performance.md",
        "results.md",
    }
    assert expected <= names, f"missing docs pages: {sorted(expected - names)}"


FENCED_CODE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """Markdown text without code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCED_CODE.sub("", text))


def _heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown page: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in FENCED_CODE.sub("", page.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_every_relative_link_in_the_docs_points_at_an_existing_file():
    broken = []
    for page in _doc_pages():
        for target in MARKDOWN_LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(REPO)}: {target}"
            if not linked.is_file():
                broken.append(f"{where} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _heading_anchors(linked):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


# Docs state what is true and how to use it; they do not tell how it was found or how loaded the machine was.
NARRATIVE = re.compile(
    r"this session|load average|heavy load|\bload ~?\d|earlier runs|found on the way|bugs? found|\brerun on\b", re.I
)


def test_docs_state_facts_without_lab_notebook_narrative():
    offenders = []
    for page in _doc_pages():
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            if NARRATIVE.search(line):
                offenders.append(f"{page.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "narrative in the docs:\n" + "\n".join(offenders)


def _git(*args, cwd):
    return subprocess.run(
        ["git", "-c", "user.name=ci-test", "-c", "user.email=ci@test", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


PROBE_TIER = """\
out="$PROBE_OUT/$1"
pwd > "$out.pwd"
ls -A .. > "$out.beside"
git rev-parse HEAD > "$out.head"
ls -A > "$out.files"
cat committed.txt > "$out.committed"
if read -r line; then echo "stdin: $line" > "$out.stdin"; else echo eof > "$out.stdin"; fi
exit "$2"
"""


def test_ci_runs_tiers_in_a_bare_clone_of_head_and_propagates_failure(tmp_path):
    """Ci runs tiers in a clone of head with nothing beside it and propagates failure."""
    source = tmp_path / "checkout"
    (source / ".ci").mkdir(parents=True)
    run = (REPO / ".ci" / "run").read_text()
    # add two tiers the way a helper would: one line each in the list, one script each
    run = re.sub(r"^tier main$", "tier main\ntier passing\ntier failing", run, count=1, flags=re.M)
    (source / ".ci" / "run").write_text(run)
    (source / ".ci" / "tier_passing.sh").write_text("bash .ci/probe.sh passing 0\n")
    (source / ".ci" / "tier_failing.sh").write_text("bash .ci/probe.sh failing 7\n")
    (source / ".ci" / "probe.sh").write_text(PROBE_TIER)
    (source / "committed.txt").write_text("in HEAD\n")
    _git("init", "-q", cwd=source)
    _git("add", "-A", cwd=source)
    _git("commit", "-q", "-m", "probe", cwd=source)
    head = _git("rev-parse", "HEAD", cwd=source)
    (source / "committed.txt").write_text("uncommitted edit\n")
    (source / "untracked.txt").write_text("not in HEAD\n")
    (tmp_path / "shared").mkdir()  # data beside the checkout must not be beside the clone
    probe_out, temporary = tmp_path / "probe", tmp_path / "tmp"
    probe_out.mkdir()
    temporary.mkdir()
    env = {**os.environ, "CI": "true", "PROBE_OUT": str(probe_out), "TMPDIR": str(temporary)}

    def ci(*tiers):
        return subprocess.run(
            ["bash", str(source / ".ci" / "run"), *tiers],
            env=env,
            input=b"typed\n",
            capture_output=True,
            timeout=120,
        )

    result = ci("passing")
    assert result.returncode == 0, result.stderr.decode()
    clone = Path((probe_out / "passing.pwd").read_text().strip())
    assert clone.parent.parent == temporary.resolve() and clone != source
    assert (probe_out / "passing.beside").read_text().split() == [clone.name]
    assert (probe_out / "passing.head").read_text().strip() == head
    assert "untracked.txt" not in (probe_out / "passing.files").read_text().split()
    assert (probe_out / "passing.committed").read_text() == "in HEAD\n"
    assert (probe_out / "passing.stdin").read_text().strip() == "eof"
    assert list(temporary.iterdir()) == []  # the clone is removed afterwards
    assert b"uncommitted changes" in result.stderr

    result = ci("failing", "passing")
    assert result.returncode == 7
    assert b"tier failing: exit status 7" in result.stdout and b"tier passing: exit status 0" in result.stdout
    assert list(temporary.iterdir()) == []

"""Committed docs and examples tell one story and name nothing of the machine that made them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REPORTS = sorted(p for p in (ROOT / "reports").rglob("*") if p.suffix in (".html", ".json", ".md"))
EXAMPLE = ROOT / "examples" / "train_nft_tiny.yaml"
# Folders that exist only on the machine that wrote a file: temporary folders, home folders, this
# project's machines' work folders, and their macOS and Windows spellings.
MACHINE_PATH = re.compile(r"(?<![\w.])(/tmp/|/var/tmp/|/var/folders/|/private/var/|/root/|/home/[^/\s]+/|/Users/[^/\s]+/"
                          r"|/work/|/mnt/|/scratch/|[A-Za-z]:\\\\?Users\\\\?)")
STORY_FILES = {
    "README.md": ROOT / "README.md",
    "docs/training.md": ROOT / "docs" / "training.md",
    "examples/train_nft_tiny.yaml": EXAMPLE,
}
STORY_LINE = re.compile(r"(save_tiny_pipeline\('tiny-sd3'|ngdiag train examples/train_nft_tiny\.yaml|ngdiag compare runs/)")


def _text_of_notebook(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells)


def test_reports_exist():
    names = {p.name for p in REPORTS}
    assert {"demo-audit.html", "demo-audit-summary.json", "tiny-nft-compare.html", "tiny-nft-sensitivity.html"} <= names


@pytest.mark.parametrize("path", REPORTS, ids=[p.name for p in REPORTS])
def test_committed_reports_name_no_machine_folder(path):
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)  # base64 may hold "/tmp/" by chance
    hits = sorted({text[max(0, m.start() - 20): m.end() + 30] for m in MACHINE_PATH.finditer(text)})
    assert not hits, hits[:5]


def test_machine_path_pattern():
    for bad in ("/tmp/rep/demo/models", "/root/x", "/home/ana/runs", "/Users/bo/ngdiag", "C:\\Users\\bo", "/work/wt"):
        assert MACHINE_PATH.search(f'"checkpoint": "{bad}"'), bad
    for fine in ("runs/tiny-nft-plain/checkpoint-20", "demo-out/models/tiny-sd3-base", "https://x.org/tmp/a"):
        assert not MACHINE_PATH.search(f'"checkpoint": "{fine}"'), fine


def _story(path: Path) -> list:
    """The training story's command lines (in the bash blocks of a Markdown file, in the comments of
    the YAML config), without the comment marker and trailing comments."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        candidates = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    else:
        candidates = [line.lstrip().lstrip("#") for line in text.splitlines() if line.lstrip().startswith("#")]
    lines = []
    for line in candidates:
        line = line.strip()
        if STORY_LINE.search(line):
            lines.append(re.sub(r"\s{2,}#.*$", "", line).strip())
    return lines


def test_readme_config_comment_and_training_docs_tell_the_same_story():
    stories = {name: _story(path) for name, path in STORY_FILES.items()}
    readme = stories["README.md"]
    assert len(readme) == 4, readme  # make the pipeline, train twice, compare
    for name, story in stories.items():
        assert story == readme, (name, story)
    config = yaml.safe_load(EXAMPLE.read_text())
    # the config's own output_dir is the first run's, so the plain command matches the first line
    assert f"output_dir={config['output_dir']}" in readme[1] and "normguard.lam=0" in readme[1]


def test_checkpoint_paths_in_the_docs_are_the_ones_ngdiag_train_writes():
    """``ngdiag train`` writes ``OUTPUT_DIR/checkpoint-N/`` (a PEFT adapter folder, no ``lora/`` below it)
    at every ``checkpoint_every`` iterations and at the end; every path to a run of the story must be one."""
    config = yaml.safe_load(EXAMPLE.read_text())
    written = set(range(config["checkpoint_every"], config["iterations"] + 1, config["checkpoint_every"]))
    written.add(config["iterations"])
    story_runs = {m.group(1) for line in _story(ROOT / "README.md") for m in re.finditer(r"output_dir=(\S+)", line)}
    texts = {name: path.read_text(encoding="utf-8") for name, path in STORY_FILES.items()}
    texts.update({p.name: _text_of_notebook(p) for p in (ROOT / "notebooks").glob("*.ipynb")})
    seen = 0
    for name, text in texts.items():
        for m in re.finditer(r"(runs/[\w.-]+)/checkpoint-(\d+)(/[\w.-]+)?", text):
            run, n, below = m.group(1), int(m.group(2)), m.group(3)
            assert below is None, (name, m.group(0))
            if run.startswith("runs/tiny-"):
                seen += 1
                assert run in story_runs, (name, m.group(0), story_runs)
                assert n in written, (name, m.group(0), sorted(written))
    assert seen >= 3

"""README and docs/ say what the code does: they render as written, their links and make targets
exist, their `python -m job` commands parse, the flag reference is current, and the make targets
they show pass what they say."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from job.cli import make_parser, reference_markdown
from tests.conftest import REPO

PAGES = [Path(REPO, "README.md"), *sorted(Path(REPO, "docs").glob("*.md"))]
MAKE_TARGETS = set(re.findall(r"^([a-z][a-z0-9-]*):", Path(REPO, "Makefile").read_text(), re.M))


def tokens(page: Path):
    return MarkdownIt("commonmark").enable("table").parse(page.read_text())


def code_and_text(page: Path) -> list[str]:
    """Every command a page shows: its shell code blocks (```sh) and inline code spans."""
    found = []
    for token in tokens(page):
        if token.type == "fence" and token.info.strip() in ("sh", "bash", "shell"):
            found.append(token.content)
        for child in token.children or []:
            if child.type == "code_inline":
                found.append(child.content)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_heading_line_renders_as_a_heading(page):
    # A fence left open (or closed with trailing text) turns the rest of a page into code.
    headings = {t.map[0] for t in tokens(page) if t.type == "heading_open"}
    lines = page.read_text().splitlines()
    fenced = {i for t in tokens(page) if t.type in ("fence", "code_block") for i in range(*t.map)}
    for i, line in enumerate(lines):
        if re.match(r"#{2,3} ", line):
            assert i in headings and i not in fenced, f"{page.name}:{i + 1}: {line}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_images_exist(page):
    for token in tokens(page):
        for child in token.children or []:
            target = child.attrs.get("href") or child.attrs.get("src")
            if target and not re.match(r"[a-z]+:|#", target):
                assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_named_exists(page):
    for code in code_and_text(page):
        for target in re.findall(r"(?:^|[\s`(])make ([a-z][a-z0-9-]*)", code):
            assert target in MAKE_TARGETS, f"{page.name}: make {target}"


def job_commands(code: str) -> list[str]:
    """`python -m job ...` command lines of a code block, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [m.group(1) for m in re.finditer(r"python -m job (.*)", joined)]


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "cli.md"], ids=lambda p: p.name)
def test_every_job_command_shown_parses(page):
    parser = make_parser()
    for code in code_and_text(page):
        for command in job_commands(code):
            args = shlex.split(command, comments=True)
            if not args or args[0] not in ("prepare-data", "train", "retrain", "evaluate"):
                continue  # prose such as "python -m job train ..." in a sentence
            try:
                parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"{page.name}: python -m job {command}")


def test_the_flag_reference_is_current():
    assert Path(REPO, "docs", "cli.md").read_text() == reference_markdown(), "run `make docs`"


def make_dry_run(*args: str) -> str:
    r = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_submit_passes_a_uri_through_and_needs_no_local_data():
    out = make_dry_run("submit", "DATA=s3://bucket/fashion-mnist", "STORAGE=s3://bucket/ckpt")
    assert "--data s3://bucket/fashion-mnist" in out and "--storage-path s3://bucket/ckpt" in out
    assert "prepare-data" not in out and "dataset-fashion-mnist" not in out
    assert "--model" not in out and "--epochs" not in out  # make variables the user did not set


def test_make_passes_only_the_variables_the_user_set():
    strong = re.sub(r"\\\n\s*", " ", make_dry_run("train-local", "FLAGS=--recipe strong"))
    job_line = next(line for line in strong.splitlines() if "-m job train" in line)
    assert "--model" not in job_line and "--epochs" not in job_line, job_line
    two = re.sub(r"\\\n\s*", " ", make_dry_run("train-local", "EPOCHS=2", "WORKERS=1"))
    assert "--epochs 2 --num-workers 1" in two, two


@pytest.mark.parametrize("target", ["train-local", "submit", "gpu-check"])
def test_flags_reach_the_job(target):
    out = make_dry_run(target, "FLAGS=--fast --seed 3")
    job_line = re.sub(r"\\\n\s*", " ", out)
    assert re.search(r"(python -m job train|gpu_check\.py) .*--fast --seed 3", job_line), out


def test_k8s_render_needs_only_pyyaml():
    out = make_dry_run("-B", "k8s-render")
    assert "pip install -q 'pyyaml>=6'" in out and "-e '.[dev]'" not in out


def test_the_promotion_floor_is_the_strong_models_measured_minimum_less_its_margin():
    import math
    import tomllib

    section = Path(REPO, "docs", "recipes.md").read_text().split("## strong")[1]
    measured = [float(a) for a in re.findall(r"^\| \d \| (0\.\d{4}) \|", section, re.M)]
    margin = float(re.search(r"less a\s+margin of (0\.\d+)", section).group(1))
    floor = tomllib.loads(Path(REPO, "k8s", "job.toml").read_text())["min_accuracy"]
    assert len(measured) >= 3 and f"min {min(measured):.4f}" in section
    assert floor == math.floor((min(measured) - margin) * 100) / 100  # rounded down, two decimals

"""README and docs/ say what the code does: they render as written, their links and make targets
exist, their `python -m job` commands parse, the flag reference is current, and the make targets
they show pass what they say."""

from __future__ import annotations

import json
import os
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


MAKE_VARIABLES = {a or b for a, b in re.findall(r"\$\(([A-Z_]+)\)|given,([A-Z_]+),",
                                                Path(REPO, "Makefile").read_text())}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_and_variable_named_exists(page):
    for code in code_and_text(page):
        for target in re.findall(r"(?:^|[\s`(])make ([a-z][a-z0-9-]*)", code):
            assert target in MAKE_TARGETS, f"{page.name}: make {target}"
        for line in re.findall(r"(?:^|[\s`(])make [a-z][a-z0-9-]*((?: [A-Z_]+=\S+)+)", code):
            for variable in re.findall(r" ([A-Z_]+)=", line):
                assert variable in MAKE_VARIABLES, f"{page.name}: make ... {variable}="


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


@pytest.fixture(scope="module")
def full_data(source_dir, tmp_path_factory) -> str:
    """The whole data set as `prepare-data` writes it by default (8 shards a split, 2 s)."""
    from job.data import prepare_data

    out = str(tmp_path_factory.mktemp("full") / "fashion-mnist")
    prepare_data(source_dir, out)
    return out


def make_job_args(make_args: list[str]) -> list[list[str]]:
    """The `python -m job train` arguments a `make` command runs (`make -n`)."""
    from bench import seeds

    found = []
    for line in re.sub(r"\\\n\s*", " ", make_dry_run(*make_args)).splitlines():
        if m := re.search(r"-m job (train .*)", line):
            found.append(shlex.split(m.group(1)))
        elif m := re.search(r"-m bench\.seeds (.*)", line):
            a = seeds.make_parser().parse_args(shlex.split(m.group(1)))
            found += [seeds.train_args(a.recipe, seed, a.data, Path(a.out), a.flags) for seed in a.seeds]
    assert found, f"make {shlex.join(make_args)} runs no training"
    return found


def training_commands(page: Path) -> list[list[str]]:
    """Every `python -m job train|retrain` and `make train-local|submit|seeds` a page shows."""
    found = []
    for code in code_and_text(page):
        for command in job_commands(code):
            args = shlex.split(command, comments=True)
            if args and args[0] in ("train", "retrain"):
                found.append(args)
        for line in re.sub(r"\\\n\s*", " ", code).splitlines():
            if m := re.match(r"\s*make ((?:train-local|submit|seeds)\b.*)", line):
                found += make_job_args(shlex.split(m.group(1), comments=True))
    return found


CONFIG_FILES = {"/etc/fashion/job.toml": str(Path(REPO, "k8s", "job.toml"))}  # the ConfigMap's


@pytest.mark.slow  # make -n of each make command: ~10 s
@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "cli.md"], ids=lambda p: p.name)
def test_every_training_command_shown_passes_the_jobs_checks(page, full_data):
    """All the job checks before Ray starts (its config, the dataset's shards against the batch
    and worker counts), on the whole data set as prepare-data writes it by default."""
    from job import data as D
    from job.config import JobError, build_config, load_config_file

    manifest = D.validate_dataset(full_data)
    for args in training_commands(page):
        flags = vars(make_parser().parse_args(args))
        flags.pop("command")
        config = flags.pop("config", None)
        try:
            file_values = load_config_file(CONFIG_FILES.get(config, config)) if config else {}
            cfg = build_config(file_values, {**flags, "data": full_data})
            D.check_partitions(cfg.data, manifest, cfg.batch_size, cfg.world_sizes)
        except JobError as e:
            pytest.fail(f"{page.name}: python -m job {shlex.join(args)}: {e}")


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


# Pointers from code, manifests and pages to a page's section: "(docs/kubernetes.md: deadlines)",
# "(README: on a Ray cluster)"; the section is the start of one of the page's headings.
POINTER = re.compile(r"\b(README|docs/[\w-]+\.md): ([^):;,`\n]+)")
# A path of this repository named in a page, a comment or a docstring.
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:job|k8s|cluster|bench|tests|docs)/[\w./-]*[\w/])")
TRACKED = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
TEXT_FILES = [Path(REPO, f) for f in TRACKED if "schemas/" not in f and (
    Path(f).suffix in (".py", ".md", ".yaml", ".toml", ".sh") or Path(f).name in ("Makefile", "Dockerfile"))]


def headings(page: Path) -> list[str]:
    return [re.sub(r"[`*]", "", line.lstrip("#").strip()).lower()
            for line in page.read_text().splitlines() if re.match(r"#{1,4} ", line)]


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_section_and_path_pointed_to_exists(path):
    text = path.read_text()
    for page, section in POINTER.findall(text):
        target = Path(REPO, "README.md" if page == "README" else page)
        assert target.exists(), f"{page} ({section})"
        assert any(h.startswith(section.strip().lower()) for h in headings(target)), \
            f"no section {section.strip()!r} in {page}"
    for named in REPO_PATH.findall(text):
        if "." not in named.rstrip(".") and not named.endswith("/"):
            continue  # a module path, or a Kubernetes `job/NAME`
        assert Path(REPO, named.rstrip(".")).exists() or list(Path(REPO).glob(named)), named


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_test_a_page_names_exists(page):
    defined = set(re.findall(r"^def (test_\w+)\(", "".join(
        f.read_text() for f in Path(REPO, "tests").glob("test_*.py")), re.M))
    for code in code_and_text(page):
        if re.fullmatch(r"test(_[a-z0-9]+){3,}", code):  # not a metric such as `test_accuracy`
            assert code in defined, f"{page.name}: {code}"


def quick_start_commands() -> list[str]:
    """The README's one-machine commands, in the order written: its Quick start's shell blocks
    and the `make` examples in its text (`make X VAR=...`), but `make test`, which runs this."""
    section = Path(REPO, "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    found = []
    for token in MarkdownIt("commonmark").enable("table").parse(section):
        if token.type == "fence" and token.info.strip() == "sh":
            found += [line.split("  #")[0].strip() for line in token.content.splitlines() if line.strip()]
        found += [c.content for c in token.children or []
                  if c.type == "code_inline" and re.match(r"make [\w-]+ \w+=", c.content)]
    return [c for c in found if c != "make test"]


@pytest.mark.slow
def test_the_quick_start_runs_in_order_from_a_clean_clone(tmp_path):
    """Each command after the one before it, on small data (the Makefile's LIMIT), in a clone of
    this repository's HEAD that uses this checkout's venv."""
    commands = quick_start_commands()
    assert commands[0] == "make train-local" and len(commands) >= 3, commands
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", REPO, str(clone)], check=True, timeout=120)
    (clone / ".venv").symlink_to(Path(REPO, ".venv"))
    # A user's shell: not the environment of `make test`, which makes make a sub-make.
    shell_env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    for command in commands:
        args = shlex.split(command)
        if args[0] == "make":  # small data; the venv as it is (its pyproject.toml is the same)
            args[1:1] = ["-o", ".venv/.installed", "LIMIT=1600"]  # val shards of 40: --fast's 32
        r = subprocess.run(args, cwd=clone, env=shell_env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{command}: {r.stderr[-3000:]}"
        if command == "make train-local":
            assert re.fullmatch(r"\[seed-w2-e10-\w{8}\] test accuracy 0\.\d{4}, test loss \d\.\d{4} "
                                rf"\(best epoch \d+\); wrote {clone}/runs/local",
                                r.stdout.strip().splitlines()[-1]), r.stdout[-2000:]
    assert {"metrics.json", "model"} <= set(os.listdir(clone / "runs" / "local"))
    assert json.loads(r.stdout)["test_accuracy"] > 0.15  # the last: `python -m job evaluate`

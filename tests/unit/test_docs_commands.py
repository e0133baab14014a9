"""Every command the docs show (each line of a ```bash block in README.md, docs/*.md and
infra/README.md that starts with `owl ` or `make `) is accounted for: run here as written, run as
written by the named test (which reads that doc), a syntax line (`owl run JOB [--set P=V ...]`)
whose subcommand exists, or listed with the reason it needs more than a test can give (a cluster,
a finished demo run). The commands are found in the docs, so a new one fails this test until it is
put in one of these lists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipelines import cli

ROOT = Path(__file__).resolve().parents[2]

DOC_FILES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")), "infra/README.md"]  # fmt: skip

# Run by this test, as written, in a scratch folder holding the repository's jobs/ (the demo's
# relative storage lands there).
RUN_HERE = {
    "owl run jobs/demo.yaml --dry-run",
    "owl status jobs/demo.yaml --json",
    "owl status jobs/demo.yaml",
    "owl run jobs/owl2-llama2-7b.yaml --dry-run --set storage=/mnt/shared/owl2",
    "owl run jobs/demo.yaml --dry-run --set stage2.evaluate.every=600 --set "
    "\"stage2.evaluate.benchmarks=['@shapes/benchmarks/vqa.jsonl']\" --set stage2.evaluate.limit=100",
}

# Every `owl` line of these docs is run as written by that test, which reads the doc.
DOC_RUN_BY = {
    "docs/benchmarks.md": "tests/unit/test_importers.py::test_documented_commands_run_as_written",
    "docs/model.md": "tests/unit/test_model_releases.py::test_documented_convert_commands_run_as_written",
}  # fmt: skip

DEMO_AFTER = "tests/e2e/test_demo.py::test_documented_commands_after_the_demo_run_as_written"
# One command, run as written by that test (which reads the doc it comes from).
RUN_BY = {
    "make demo": "tests/unit/test_makefile.py::test_make_demo_sets_up_then_runs_the_demo_job",
    "make test": "tests/unit/test_makefile.py::test_make_test_lints_then_runs_the_whole_suite",
    "make test-newest": "tests/unit/test_ci.py::test_make_test_newest_without_python_313_is_one_line",
    "make test-slow": "tests/unit/test_makefile.py::test_make_test_slow_runs_only_the_slow_tests",
    "owl run jobs/owl2-llama2-7b.yaml --dry-run --set stage2.memory.gpu_memory_gib=16":
        "tests/unit/test_memory_plan.py::test_dry_run_shows_the_plan_and_refuses_one_that_does_not_fit",
    "owl status jobs/owl1-llama-7b.yaml":
        "tests/unit/test_mix_steps.py::test_the_documented_mixture_command_runs_as_written",
    "owl submit jobs/owl2-llama2-7b.yaml --address http://HEAD:8265 --set storage=/mnt/shared/owl2":
        "tests/integration/test_cluster.py::test_infra_readme_token_setup_works_as_written",
    "owl logs owl-owl2-llama2-7b-<hash> --address http://HEAD:8265 --follow":
        "tests/integration/test_cluster.py::test_infra_readme_token_setup_works_as_written",
    # The demo, in a scratch folder holding jobs/ (its storage runs/demo lands there), then the
    # commands that need its finished run: cached runs and MLflow reads, seconds each.
    "owl run jobs/demo.yaml": "tests/e2e/test_demo.py::test_demo_runs_every_step_and_registers_the_model",
    "owl run jobs/demo.yaml --until stage1": DEMO_AFTER,
    "owl run jobs/demo.yaml --set stage2.resources.fewer_workers=continue --set stage2.resources.min_workers=1":
        DEMO_AFTER,
    "owl audit model demo@current --job jobs/demo.yaml": DEMO_AFTER,
    "owl audit dataset <digest-prefix> --job jobs/demo.yaml": DEMO_AFTER,
}  # fmt: skip

NOT_RUN = {
    "owl run jobs/demo.yaml --set model.variant=owl1": "a second whole demo run (Owl1 keys differ "
    "from the first step on: minutes of training on 2 cores); Owl1 trains end to end in "
    "tests/e2e/test_recipe_rehearsal.py (its recipe on tiny data)",
    "owl run jobs/demo.yaml --force stage2": "recomputes stage 2 and what follows, most of the "
    "demo's time; --force: tests/unit/test_runner.py",
    "owl logs <submission-id> --address http://HEAD:8265 --follow": "needs a cluster (a Ray head's "
    "dashboard); test_cluster runs infra/README.md's copy of this line with its id put in",
    "owl run jobs/owl2-llama2-7b.yaml --set stage1.resources.fewer_workers=continue --set stage1.resources.min_workers=32":
    "a 7B run on a GPU cluster; tests/unit/test_fewer_workers.py plans it (--dry-run) and checks "
    "that it keeps the training steps' cache keys",
}  # fmt: skip

# A syntax line: an upper-case placeholder (JOB, NAME, DIGEST, SUBMISSION_ID, ...) or [optional].
SYNOPSIS = re.compile(r"\b[A-Z][A-Z_]{2,}\b|\[")


def documented_commands() -> list[tuple[str, str]]:
    """(doc, command) for each `owl ` / `make ` line of a bash block, its `# comment` removed."""
    found = []
    for doc in DOC_FILES:
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.DOTALL):
            for line in block.splitlines():
                if line.startswith(("owl ", "make ")):
                    found.append((doc, re.sub(r"\s+#.*$", "", line).strip()))
    return found


def _is_synopsis(command: str) -> bool:
    return command.startswith("owl ") and bool(SYNOPSIS.search(command.replace("HEAD:", "")))


def test_every_documented_command_is_accounted_for():
    commands = documented_commands()
    assert len(commands) >= 30 and {doc for doc, _ in commands} >= {"README.md", "infra/README.md"}
    unaccounted = [
        (doc, command)
        for doc, command in commands
        if command not in RUN_HERE | set(RUN_BY) | set(NOT_RUN)
        and doc not in DOC_RUN_BY
        and not _is_synopsis(command)
    ]
    assert unaccounted == [], "run these here, name the test that runs them, or say why not"


@pytest.mark.parametrize("test_id", sorted(set(RUN_BY.values()) | set(DOC_RUN_BY.values())))
def test_the_named_tests_exist_and_read_the_docs(test_id):
    path, name = test_id.split("::")
    source = (ROOT / path).read_text()
    assert f"def {name}(" in source, test_id
    # It reads the doc, or holds the command itself (as a line or as an argument list).
    for doc, command in documented_commands():
        if RUN_BY.get(command) == test_id:
            as_list = '", "'.join(shlex.split(command))
            assert Path(doc).name in source or command in source or as_list in source, command
    for doc in (doc for doc, by in DOC_RUN_BY.items() if by == test_id):
        assert Path(doc).name in source, (test_id, doc)


def test_syntax_lines_name_real_subcommands(capsys):
    synopses = [
        c for _, c in documented_commands() if _is_synopsis(c) and c not in NOT_RUN | RUN_BY
    ]
    assert synopses  # docs/pipeline.md's command reference
    for line in synopses:
        words = [
            w for w in shlex.split(line.replace("[", " ").replace("]", " "))[1:3] if w.islower()
        ]
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*words, "--help"])
        assert exit_info.value.code == 0, line
    capsys.readouterr()


def test_commands_run_here_as_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OWL_STEPS_TABLE", raising=False)
    shown = {c for _, c in documented_commands()}
    assert shown >= RUN_HERE  # still in the docs
    for command in sorted(RUN_HERE):
        capsys.readouterr()
        assert cli.main(shlex.split(command)[1:]) == 0, (command, capsys.readouterr())
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("manifest.json"))

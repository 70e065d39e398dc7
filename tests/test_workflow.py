"""The GitHub Actions workflow (.github/workflows/ci.yml, step 20's README, "The CI/CD
workflow"), checked without GitHub: its schema (check-jsonschema's copy of SchemaStore's),
actionlint, checkov's GitHub Actions policies; what each job runs; and the release job's
script, run here, renders production manifests that name the image by digest."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.manifests import CHECKOV, KUBECTL, objects, validate
from tools.steps import ROOT, all_steps

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
BIN = Path(sys.executable).parent
TAGS_ONLY = "startsWith(github.ref, 'refs/tags/v')"
QUIET = ["--compact", "--quiet", "--skip-download"]  # checkov: failures only, offline


def jobs() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]


def runs(job: str) -> list[str]:
    return [step["run"] for step in jobs()[job]["steps"] if "run" in step]


def actionlint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "actionlint", "-no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_the_workflow_matches_githubs_schema():
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.github-workflows", WORKFLOW],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_passes_and_would_catch_a_job_that_needs_none(tmp_path):
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "ci.yml"
    broken.write_text(
        WORKFLOW.read_text().replace("needs: [steps, images]", "needs: [steps, image]")
    )
    assert 'needs job "image" which does not exist' in actionlint(broken).stdout


def test_checkovs_github_actions_policies_pass():
    result = subprocess.run(
        [CHECKOV, "--file", WORKFLOW, "--framework", "github_actions", *QUIET],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_every_push_is_linted_tested_and_its_manifests_checked_as_here():
    """The same commands as on this machine: `make lint`, `.ci/run` (which runs `make test`),
    tools/manifests.py and hadolint, in a Debian container with Python 3.11."""
    assert runs("lint") == ["make lint"]
    assert runs("test")[0].startswith("bash .ci/run")
    assert ".venv/bin/python tools/manifests.py" in runs("manifests")
    assert ".venv/bin/hadolint Dockerfile" in runs("manifests")
    for job in ("lint", "test", "manifests"):
        assert "if" not in jobs()[job], job
        assert jobs()[job]["container"] == "python:3.11-bookworm"


def test_images_are_built_and_pushed_for_release_tags_only_one_per_step():
    images = jobs()["images"]
    assert images["if"] == TAGS_ONLY and jobs()["release-manifests"]["if"] == TAGS_ONLY
    assert set(images["needs"]) == {"lint", "test", "manifests", "steps"}
    assert images["permissions"]["packages"] == "write"
    build = next(s for s in images["steps"] if s.get("id") == "build")
    assert build["with"]["push"] is True
    assert build["with"]["build-args"] == "STEP=${{ matrix.step }}"
    # The matrix is every step folder, listed by the `steps` job as the shell sees them.
    listing = subprocess.run(
        ["bash", "-c", "ls -d step-*/ | tr -d /"], cwd=ROOT, capture_output=True, text=True
    )
    assert listing.stdout.split() == [step.name for step in all_steps()]


@pytest.fixture
def release_script() -> str:
    """The release job's script that pins the image and renders the manifests."""
    (script,) = [run for run in runs("release-manifests") if "kustomization.yaml" in run]
    return script


def test_the_release_job_renders_production_manifests_with_the_image_by_digest(
    tmp_path, release_script
):
    """Run as the job runs it, in a checkout with image.txt from the images job."""
    step = all_steps()[-1]
    (tmp_path / step.name).symlink_to(step.path)
    digest = "sha256:" + "0123456789abcdef" * 4
    image = f"ghcr.io/someone/grpc-mastery/{step.name}"
    (tmp_path / "image.txt").write_text(f"{image}@{digest}\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "bin").symlink_to(KUBECTL.parent)
    result = subprocess.run(
        ["bash", "-e", "-c", release_script],
        env={**os.environ, "NEWEST": step.name},  # the `steps` job's output
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = (tmp_path / "manifests.yaml").read_text()
    ours = {
        container["image"]
        for o in objects(rendered)
        if o["kind"] == "Deployment"
        for container in o["spec"]["template"]["spec"]["containers"]
        if "grpc-mastery" in container["image"]
    }
    assert ours == {f"{image}@{digest}"}
    assert validate(rendered) == []

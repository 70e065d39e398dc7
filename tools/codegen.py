"""Generate the Python gRPC code of every step from its protos/ (used by `make protos`).

For each .proto under step-NN/protos/ this writes, next to the step's code:
  <pkg>/<name>_pb2.py, <pkg>/<name>_pb2_grpc.py, <pkg>/<name>_pb2.pyi, <pkg>/<name>_pb2_grpc.pyi
(the last, the types of the stubs and servicers, by mypy-protobuf's protoc-gen-mypy_grpc:
grpcio-tools types the messages only). From step 19 on, where the protos map RPCs to HTTP
(`google.api.http`), it also writes deploy/greeter.pb: the descriptor set Envoy's JSON
transcoder reads. From step 20 on, where the step deploys to Kubernetes (deploy/kustomization.yaml),
deploy/envoy-kubernetes.yaml: deploy/envoy.yaml with the upstreams Kubernetes names
(tools/envoy.py, kubernetes_config).
The files are checked in so a learner can read them; tests/test_codegen.py fails when they
differ from a fresh generation.

Usage: python tools/codegen.py [NN ...]
"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from google.api import annotations_pb2

from tools.envoy import write_kubernetes_config
from tools.steps import select_steps

GENERATED_SUFFIXES = (
    *("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi", ".pb"),
    "envoy-kubernetes.yaml",  # step 20 on: Envoy's config in Kubernetes, from deploy/envoy.yaml
)
# google/api/annotations.proto (the HTTP mapping) and google/rpc/*.proto (the status details
# in REST error bodies) ship in googleapis-common-protos, beside its generated modules.
GOOGLEAPIS_PROTOS = Path(annotations_pb2.__file__).resolve().parents[2]
HTTP_MAPPING_IMPORT = 'import "google/api/annotations.proto";'
# What Envoy's transcoder must know: the public API, and the details a refusal carries
# (RetryInfo, QuotaFailure, BadRequest), to print them in JSON.
DESCRIPTOR_SET = Path("deploy") / "greeter.pb"
DESCRIPTOR_SET_EXTRAS = ["google/rpc/error_details.proto"]


def is_generated(path: Path | str) -> bool:
    return str(path).endswith(GENERATED_SUFFIXES)


def protos_of(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "protos").rglob("*.proto"))


def vendored_to_generate(step_dir: Path) -> list[str]:
    """The vendored protos generated with the step's own (third_party/buf/validate, step 21
    on: the rules' definitions), relative to third_party/."""
    root = step_dir / "third_party"
    return sorted(str(p.relative_to(root)) for p in (root / "buf").rglob("*.proto"))


def maps_to_http(step_dir: Path) -> bool:
    return any(HTTP_MAPPING_IMPORT in p.read_text() for p in protos_of(step_dir))


def protoc(step_dir: Path, *args: str) -> None:
    """protoc from grpcio-tools (so the version is the locked one), in the step's protos/."""
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={step_dir / 'protos'}",
        f"--proto_path={GOOGLEAPIS_PROTOS}",
        # What the step vendors (third_party/): google/api (also installed, identical) and,
        # step 21 on, buf/validate, which no installed package ships.
        *(
            [f"--proto_path={step_dir / 'third_party'}"]
            if (step_dir / "third_party").exists()
            else []
        ),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed for {step_dir.name}:\n{result.stderr}")


def generate(step_dir: Path, out_dir: Path) -> None:
    """The Python code of every proto of the step into out_dir, and the descriptor set of
    its public API where it maps RPCs to HTTP."""
    proto_root = step_dir / "protos"
    protos = [str(p.relative_to(proto_root)) for p in protos_of(step_dir)]
    out_dir.mkdir(parents=True, exist_ok=True)
    protoc(
        step_dir,
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).with_name('protoc-gen-mypy_grpc')}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
        *vendored_to_generate(step_dir),
    )
    if maps_to_http(step_dir):
        (out_dir / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
        api = [p for p in protos if p.startswith("greeter/")]
        protoc(
            step_dir,
            "--include_imports",
            f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
            *api,
            *DESCRIPTOR_SET_EXTRAS,
        )
    if (step_dir / "deploy" / "kustomization.yaml").exists():  # step 20 on: Kubernetes
        write_kubernetes_config(step_dir, out_dir)


def main(argv: list[str]) -> int:
    for step in select_steps(argv):
        generate(step.path, step.path)
        print(f"generated {step.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Generate the Python gRPC code of every step from its protos/ (used by `make protos`).

For each .proto under step-NN/protos/ this writes, next to the step's code:
  <pkg>/<name>_pb2.py, <pkg>/<name>_pb2_grpc.py, <pkg>/<name>_pb2.pyi, <pkg>/<name>_pb2_grpc.pyi
(the last, the types of the stubs and servicers, by mypy-protobuf's protoc-gen-mypy_grpc:
grpcio-tools types the messages only).
The files are checked in so a learner can read them; tests/test_codegen.py fails when they
differ from a fresh generation.

Usage: python tools/codegen.py [NN ...]
"""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.steps import select_steps

GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def is_generated(path: Path | str) -> bool:
    return str(path).endswith(GENERATED_SUFFIXES)


def protos_of(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "protos").rglob("*.proto"))


def generate(step_dir: Path, out_dir: Path) -> None:
    """Run protoc (from grpcio-tools, so the version is the locked one) into out_dir."""
    proto_root = step_dir / "protos"
    protos = [str(p.relative_to(proto_root)) for p in protos_of(step_dir)]
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).with_name('protoc-gen-mypy_grpc')}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed for {step_dir.name}:\n{result.stderr}")


def main(argv: list[str]) -> int:
    for step in select_steps(argv):
        generate(step.path, step.path)
        print(f"generated {step.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

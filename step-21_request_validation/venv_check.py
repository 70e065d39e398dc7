"""The first import of every entry script. Run by a python without the project's packages
(a terminal where the virtual env is not active), the script would stop at `import grpc`
with a traceback; this says in one line what to do instead."""

import importlib.util
import sys

if importlib.util.find_spec("grpc") is None:
    sys.exit(
        f"error: {sys.executable} has no grpc: activate the project's virtual env first "
        "(`source ../.venv/bin/activate` in a step folder; `make venv` at the repository root "
        "makes it)"
    )

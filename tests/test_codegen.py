"""Checked-in generated code equals a fresh generation (run `make protos` when this fails)."""

from tools.codegen import generate, is_generated


def test_generated_code_is_fresh(step, tmp_path):
    generate(step.path, tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    checked_in = {
        p.relative_to(step.path): p.read_bytes()
        for p in step.path.rglob("*")
        if is_generated(p.name) and "protos" not in p.relative_to(step.path).parts
    }
    assert fresh, "protoc generated nothing"
    assert sorted(checked_in) == sorted(fresh), (
        "generated files missing or extra: run `make protos`"
    )
    stale = [str(name) for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated code {stale}: run `make protos`"

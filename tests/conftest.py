import itertools

import pytest

from tools.steps import all_steps

STEPS = all_steps()


def pytest_generate_tests(metafunc):
    """A test with a `step` argument runs once per step folder; with `pair`, once per
    adjacent pair of steps (step N-1, step N)."""
    if "step" in metafunc.fixturenames:
        metafunc.parametrize("step", STEPS, ids=[s.label for s in STEPS])
    if "pair" in metafunc.fixturenames:
        pairs = list(itertools.pairwise(STEPS))
        metafunc.parametrize("pair", pairs, ids=[f"{a.label}-{b.label}" for a, b in pairs])


@pytest.fixture(scope="session")
def steps():
    return STEPS

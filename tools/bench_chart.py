"""The chart of `make bench`: what each step adds to the CPU time of a `SayHello` call.

    python tools/bench_chart.py [bench/results.json] [bench/cost.png]

tools/bench.py draws it after a run, from the medians it writes to results.json; this module
draws it again from that file (to restyle it without measuring again).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
from tools.steps import ROOT, STEP_NAMES


def feature(label: str) -> str:
    """ "04" -> "04 interceptors": the step's folder name says what it adds."""
    if not label.isdigit():
        return label
    name = STEP_NAMES[int(label) - 1]
    return f"{label} {name.split('_', 1)[1].replace('_', ' ')}"


def draw(results: dict, out: Path) -> None:
    """A bar per variant: its CPU µs per call, split into what the step before it cost and
    what this step adds; the spread over the rounds as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write a file
    import matplotlib.pyplot as plt

    rows = [row for row in results["variants"] if "@" not in row["name"]]
    names = [feature(row["name"]) for row in rows]
    totals = [row["cpu_us_per_call"] for row in rows]
    before = [0.0, *totals[:-1]]
    before[0] = 0.0
    if rows[0]["name"] == "bare":  # the bare server is the floor, not a step before step 01
        before[1] = 0.0
    added = [total - base for total, base in zip(totals, before, strict=True)]
    low = [total - row["cpu_us_per_call_min"] for total, row in zip(totals, rows, strict=True)]
    high = [row["cpu_us_per_call_max"] - total for total, row in zip(totals, rows, strict=True)]

    figure, axes = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.6))
    positions = range(len(rows))
    axes.barh(positions, before, color="#c9d6e3", label="the step before")
    axes.barh(
        positions,
        added,
        left=before,
        color=["#d9534f" if a > 0 else "#5cb85c" for a in added],
        xerr=[low, high],
        ecolor="#555555",
        capsize=2,
        label="what this step adds",
    )
    for position, total, add in zip(positions, totals, added, strict=True):
        axes.text(total + 25, position, f"{total:.0f} µs ({add:+.0f})", va="center", fontsize=8)
    axes.set_yticks(list(positions), names, fontsize=9)
    axes.invert_yaxis()  # step 01 at the top, as in the table
    axes.set_xlabel("server CPU µs per SayHello call (every process of the step), median")
    axes.set_title(
        f"What each step costs per call\n{results['when']}: {results['machine']}", fontsize=9
    )
    axes.set_xlim(0, max(totals) * 1.2)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else ROOT / "bench" / "results.json"
    out = Path(argv[1]) if len(argv) > 1 else source.with_name("cost.png")
    draw(json.loads(source.read_text()), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

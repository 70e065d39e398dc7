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
    from matplotlib.patches import Patch

    rows = [row for row in results["variants"] if "@" not in row["name"]]
    names = [feature(row["name"]) for row in rows]
    totals = [row["cpu_us_per_call"] for row in rows]
    # What the step before cost: none for the bare server and step 01, the floors.
    floors = {"bare", "01"}
    before = [0.0 if row["name"] in floors else totals[i - 1] for i, row in enumerate(rows)]
    added = [total - base for total, base in zip(totals, before, strict=True)]
    low = [total - row["cpu_us_per_call_min"] for total, row in zip(totals, rows, strict=True)]
    high = [row["cpu_us_per_call_max"] - total for total, row in zip(totals, rows, strict=True)]
    colours = [
        "#8da9c4" if row["name"] in floors else "#d9534f" if add > 0 else "#5cb85c"
        for row, add in zip(rows, added, strict=True)
    ]

    figure, axes = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.6))
    positions = range(len(rows))
    axes.barh(positions, before, color="#dde6ee")
    axes.barh(
        positions, added, left=before, color=colours, xerr=[low, high], ecolor="#555555", capsize=2
    )
    right = max(row["cpu_us_per_call_max"] for row in rows)
    for position, row, total, add in zip(positions, rows, totals, added, strict=True):
        words = f"{total:.0f} µs" if row["name"] in floors else f"{total:.0f} µs ({add:+.0f})"
        x = row["cpu_us_per_call_max"] + right * 0.01  # past the spread's whisker
        axes.text(x, position, words, va="center", fontsize=8)
    axes.set_yticks(list(positions), names, fontsize=9)
    axes.invert_yaxis()  # step 01 at the top, as in the table
    axes.set_xlabel("server CPU µs per SayHello call (every process of the step), median")
    axes.set_title(
        f"What each step costs per call\n{results['when']}: {results['machine']}", fontsize=9
    )
    axes.set_xlim(0, right * 1.2)
    legend = {
        "#8da9c4": "the floors: a bare grpc.aio server, step 01",
        "#dde6ee": "what the step before cost",
        "#d9534f": "what this step adds",
        "#5cb85c": "what this step saves (or the noise)",
    }
    handles = [Patch(color=colour, label=words) for colour, words in legend.items()]
    axes.legend(handles=handles, loc="upper right", fontsize=8)
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

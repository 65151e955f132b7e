#!/usr/bin/env python3
"""Side-by-side table of `pipeline bench --json` and `torch_twin.py --json` runs (standard
library only): per row and tool the median ms/step over the runs (min-max beside it), items/s,
and the ratio PyTorch time / burn time (above 1: burn is faster).

    side_by_side.py --torch torch-1.json torch-2.json --burn flex flex-1.json flex-2.json \
                    [--burn libtorch tch-1.json ...] [--markdown]
"""

import argparse
import json
import statistics
import sys


def load(paths):
    runs = []
    for p in paths:
        try:
            with open(p) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            sys.exit(f"error: {p}: expected a bench JSON file ({e})")
    return runs


def per_row(runs):
    """name -> {ms: [..], items: [..], params, unit, batch, model}"""
    rows = {}
    for run in runs:
        for r in run["rows"]:
            d = rows.setdefault(r["name"], {"ms": [], "items": [], "params": r["params"],
                                            "unit": r["unit"], "batch": r["batch"], "model": r["model"]})
            d["ms"].append(r["ms_per_step"])
            d["items"].append(r["items_per_s"])
            if r.get("forward_flops"):
                d["forward_flops"] = r["forward_flops"]
            if r.get("phases"):
                d.setdefault("phases", []).append(r["phases"])
    return rows


PARTS = ("forward_ms", "backward_ms", "optimizer_ms", "ema_ms")


def phase_lines(names, tools):
    """`pipeline bench --phases`: per training row and tool, the median ms per step of each
    part (the device synced after each part)."""
    lines = []
    for n in names:
        for tool, rows in tools:
            runs = rows.get(n, {}).get("phases")
            if not runs:
                continue
            med = [statistics.median(p[k] for p in runs) for k in PARTS]
            total = sum(med)
            cells = [f"{m:.2f} ({100 * m / total:.0f}%)" if total > 0 else f"{m:.2f}" for m in med]
            lines.append(f"{n:<15} {tool:<14} " + " ".join(f"{c:>16}" for c in cells) + f" {total:>9.2f}")
    if lines:
        head = f"{'row':<15} {'tool':<14} " + " ".join(f"{h:>16}" for h in ("forward", "backward", "optimizer", "ema")) \
            + f" {'sum':>9}"
        lines = ["parts of a training step (--phases; median ms per step, the device synced after each part)", head] + lines
    return lines


def tflops(forward_flops, batch, ms):
    """Achieved TFLOP/s of a training step counted as 3 forward passes of the batch."""
    return 3 * forward_flops * batch / (ms / 1000) / 1e12


def cell(d):
    med = statistics.median(d["ms"])
    if len(d["ms"]) > 1:
        return f"{med:.1f} ({min(d['ms']):.1f}-{max(d['ms']):.1f})"
    return f"{med:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--torch", nargs="+", required=True, help="torch_twin.py --json files")
    ap.add_argument("--burn", nargs="+", action="append", required=True, metavar="NAME FILE",
                    help="a column name (flex, libtorch, cuda) and its pipeline bench --json files")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    torch_runs = load(a.torch)
    torch_rows = per_row(torch_runs)
    columns = []
    for spec in a.burn:
        if len(spec) < 2:
            sys.exit("error: --burn NAME FILE...: expected a column name and at least one file")
        runs = load(spec[1:])
        columns.append((spec[0], runs, per_row(runs)))

    names = list(columns[0][2].keys())
    head = ["row", "batch", "params"]
    for name, _, _ in columns:
        head += [f"burn-{name} ms/step", f"burn-{name} items/s"]
    head += ["PyTorch ms/step", "PyTorch items/s"]
    head += [f"ratio PyTorch/burn-{name}" for name, _, _ in columns]
    lines = []
    for n in names:
        b0 = columns[0][2][n]
        t = torch_rows.get(n)
        params = f"{b0['params']:,}"
        if t and t["params"] != b0["params"]:
            params += f" (PyTorch {t['params']:,}!)"
        cells = [n, str(b0["batch"]), params]
        for _, _, rows in columns:
            d = rows.get(n)
            cells += [cell(d), f"{statistics.median(d['items']):.1f}"] if d else ["-", "-"]
        cells += [cell(t), f"{statistics.median(t['items']):.1f}"] if t else ["-", "-"]
        for _, _, rows in columns:
            d = rows.get(n)
            if d and t:
                cells.append(f"{statistics.median(t['ms']) / statistics.median(d['ms']):.2f}")
            else:
                cells.append("-")
        lines.append(cells)

    devices = [f"burn-{name}: {runs[0]['device']}" for name, runs, _ in columns]
    devices.append(f"PyTorch: {torch_runs[0]['device']}")
    print("; ".join(devices) + f"; runs per tool: {len(torch_runs)} (median, min-max)")
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for cells in lines:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    print("ratio > 1: burn is faster; ms/step of sample-ddim50 is one DDIM step (run incl. decode / 50)")
    # The same FLOP count for every tool (the networks are the same): burn's, from the config.
    for n in names:
        flops = next((rows[n]["forward_flops"] for _, _, rows in columns
                      if n in rows and "forward_flops" in rows[n]), None)
        if flops is None:
            continue
        batch = columns[0][2][n]["batch"]
        parts = [f"burn-{name} {tflops(flops, batch, statistics.median(rows[n]['ms'])):.3f}"
                 for name, _, rows in columns if n in rows]
        if n in torch_rows:
            parts.append(f"PyTorch {tflops(flops, batch, statistics.median(torch_rows[n]['ms'])):.3f}")
        print(f"{n}: achieved TFLOP/s (matrix products, 3 x {flops / 1e9:.4f} GFLOP per latent): "
              + ", ".join(parts))
    tools = [(f"burn-{name}", rows) for name, _, rows in columns] + [("PyTorch", torch_rows)]
    for line in phase_lines(names, tools):
        print(line)


if __name__ == "__main__":
    main()

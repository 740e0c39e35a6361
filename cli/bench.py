"""`vmckpt bench NAME`: runs one of the experiments side by side and writes its raw figures
(NAME.json, what scripts/render_results.py renders into the README), a Markdown table and a
plot of it."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import click
import uvloop
from vmckpt.cli.main import main
from vmckpt.lab.experiments import EXPERIMENTS, FULL


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])
                                        for k in keys) + " |")
    return "\n".join(lines) + "\n"


def results(name: str, rows: list[dict], *, full: bool, seconds: float) -> dict:
    """NAME.json: the rows (NaN as null) and the run they come from."""
    return {"experiment": name, "full": full,
            "command": f"vmckpt bench {name}{' --full' if full else ''} -o DIR",
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "host": platform.node(),
            "kernel": platform.release(), "cpus": os.cpu_count(), "seconds": round(seconds),
            "rows": [{k: None if isinstance(v, float) and math.isnan(v) else v
                      for k, v in r.items()} for r in rows]}


def dumps(doc: dict) -> str:
    """JSON with one row a line: readable, and a re-run's diff shows which rows changed."""
    head = json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=1)
    rows = ",\n".join("  " + json.dumps(r) for r in doc["rows"])
    return f'{head[:-2]},\n "rows": [\n{rows}\n ]\n}}\n'


def plot(name: str, rows: list[dict], path: Path) -> None:
    import matplotlib  # here, not at import: it costs every vmckpt command ~0.3 s

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if name == "hugepages":
        for pages in ("4K", "2M"):
            mine = [r for r in rows if r["pages"] == pages]
            axes[0].plot([r["interval_s"] for r in mine], [r["pause_p50_ms"] for r in mine],
                         "o-", label=pages)
            axes[1].plot([r["interval_s"] for r in mine], [r["slowdown"] for r in mine], "o-",
                         label=pages)
        axes[0].set_ylabel("pause, median (ms)")
        axes[1].set_ylabel("guest slowdown (1 - on/off)")
        for ax in axes:
            ax.set_xlabel("checkpoint interval (s)")
            ax.legend(title="guest pages")
    elif name in ("interval", "qemu-interval", "scaling"):
        x = "ram" if name == "scaling" else "interval_s"
        right = {"interval": ("slowdown", "guest slowdown (1 - on/off)"),
                 "qemu-interval": ("pause_p99_ms", "pause, p99 (ms)"),
                 "scaling": ("drain_p50_ms", "drain, median (ms)")}[name]
        for s in dict.fromkeys(r["strategy"] for r in rows):
            mine = [r for r in rows if r["strategy"] == s]
            line, = axes[0].plot([r[x] for r in mine], [r["pause_p50_ms"] for r in mine], "o-",
                                 label=s)
            if s == "hybrid":  # its second, switch-back pause after each drain
                axes[0].plot([r[x] for r in mine], [r["switch_p50_ms"] for r in mine], "x--",
                             color=line.get_color(), label="hybrid switch")
            axes[1].plot([r[x] for r in mine], [r[right[0]] for r in mine], "o-", label=s)
        axes[0].set_ylabel("pause, median (ms)")
        axes[1].set_ylabel(right[1])
        for ax in axes:
            ax.set_xlabel("guest RAM" if name == "scaling" else "checkpoint interval (s)")
            ax.legend(title="tracking")
            if name != "scaling":
                ax.set_xscale("log")
    elif name == "dedup":
        ids = [r["id"] for r in rows]
        bottom = [0] * len(rows)
        for key, label in (("pages_stored_new", "stored new"), ("dedup_hits", "dedup hits"),
                           ("zero_pages", "zero pages")):
            axes[0].bar(ids, [r[key] for r in rows], bottom=bottom, label=label, width=1.0)
            bottom = [b + r[key] for b, r in zip(bottom, rows, strict=True)]
        axes[0].set_xlabel("checkpoint")
        axes[0].set_ylabel("pages dirtied")
        axes[0].legend()
        axes[1].plot(ids, [r["pause_ms"] for r in rows], ".")
        axes[1].set_xlabel("checkpoint")
        axes[1].set_ylabel("pause (ms)")
    elif name == "priority":
        labels = [f"{r['copiers']} copier{'s' if r['copiers'] > 1 else ''}, priority "
                  f"{'on' if r['priority'] else 'off'}" for r in rows]
        axes[0].barh(labels, [100 * r["cow_copies"] / max(1, r["cow_copies"] + r["copier_copies"])
                              for r in rows])
        axes[0].set_xlabel("owed pages copied on the guest's fault (%)")
        axes[1].barh(labels, [r["guest_pages_per_s"] for r in rows])
        axes[1].set_xlabel("guest writes (pages/s)")
        axes[1].tick_params(labelleft=False)
    else:  # qemu
        many = len({(r["ram"], r["work"]) for r in rows}) > 1
        # QEMU's snapshots ran on more than one guest: say whose (runs before 2026-12-02: wp's)
        kinds = [(f"{r['ram']} {r['work']}: " if many else "") + r["kind"]
                 + (f" on {r['guest']}'s guest" if "guest" in r and r["kind"].startswith("qemu")
                    else "") for r in rows]
        p50 = [r["pause_p50_ms"] for r in rows]
        spread = ([[m - r["pause_min_ms"] for m, r in zip(p50, rows, strict=True)],
                   [r["pause_max_ms"] - m for m, r in zip(p50, rows, strict=True)]]
                  if "pause_min_ms" in rows[0] else None)
        axes[0].barh(kinds, p50, xerr=spread)
        axes[0].set_xlabel("pause, median and min–max (ms, log)" if spread else
                           "pause, median (ms, log)")
        axes[0].set_xscale("log")
        axes[1].barh(kinds, [r["MB_per_checkpoint"] for r in rows])
        axes[1].set_xlabel("MB written per checkpoint")
        axes[1].tick_params(labelleft=False)
    fig.suptitle(f"vmckpt bench {name} — {platform.node()}, {platform.release()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@main.command()
@click.argument("name", type=click.Choice(sorted(EXPERIMENTS)))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("."),
              show_default=True, help="Directory for NAME.json, NAME.md and NAME.png.")
@click.option("--full", is_flag=True,
              help="The full-size run (larger guests, longer runs; see the README).")
def bench(name: str, out_dir: Path, full: bool) -> None:
    """Run an experiment and write its figures (NAME.json), a table and a plot: interval
    (pause, hybrid's switch pause and guest slowdown per strategy and interval),
    qemu-interval (pause per strategy and interval on the QEMU test guest), dedup (data per
    checkpoint of a duplicate-heavy guest), scaling (RAM sizes), priority (copiers and copy
    priority), hugepages (4 KiB vs 2 MiB guest pages), qemu (the test guest vs QEMU's own
    snapshots).
    Each fits in 10 minutes on a 2-core machine; --full runs the full sizes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("vmckpt").setLevel(logging.WARNING)  # one line a checkpoint is noise here
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmckpt-bench-") as tmp:
        rows = uvloop.run(EXPERIMENTS[name](Path(tmp), **(FULL[name] if full else {})))
    doc = results(name, rows, full=full, seconds=time.monotonic() - t0)
    (out_dir / f"{name}.json").write_text(dumps(doc))
    table = markdown(rows)
    (out_dir / f"{name}.md").write_text(table)
    plot(name, rows, out_dir / f"{name}.png")
    click.echo(table)
    click.echo(f"wrote {name}.json, {name}.md and {name}.png in {out_dir}")


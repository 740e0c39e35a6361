"""`vmckpt plot`: pause, pages dirtied, bytes stored and dedup per checkpoint over time."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from vmckpt.cli.main import _fail, main, store_option
from vmckpt.cli.text import emit_json, json_option, local_time, reading, size_text


@main.command()
@store_option
@click.option("-o", "--output", "out_file", type=click.Path(path_type=Path),
              default=Path("vmckpt-plot.png"), show_default=True, help="The PNG to write.")
@json_option
def plot(store_path: Path, out_file: Path, as_json: bool) -> None:
    """Plot pause, pages dirtied, bytes stored, disk blocks and dedup per checkpoint over
    time."""
    with reading(store_path) as store:
        records = store.list_checkpoints()
    if not records:
        _fail(f"store {store_path} holds no checkpoint to plot")
    try:
        draw(records, store_path, out_file)
    except OSError as e:
        _fail(f"cannot write {out_file}: {e.strerror}")
    if as_json:
        emit_json({"output": str(out_file), "checkpoints": len(records)})
    else:
        click.echo(f"wrote {out_file} ({len(records)} checkpoints)")


def draw(records: list[dict], store_path: Path, out_file: Path) -> None:
    import matplotlib  # only here: it adds ~0.3 s to any command that imports it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    t0 = records[0]["time"]
    t = [r["time"] - t0 for r in records]

    def series(key: str, scale: float = 1.0) -> list[float]:
        return [np.nan if r.get(key) is None else r[key] * scale for r in records]

    copied = [(r.get("pages_stored_new") or 0) + (r.get("dedup_hits") or 0) for r in records]
    def disk_mib(key: str) -> list[float]:
        return [sum(d.get(key) or 0 for d in r.get("disks") or ()) * r["page_size"] / 2**20
                for r in records]

    panels = [
        ("pause (ms)", [("pause", series("pause", 1e3))]),
        ("pages", [("dirtied", series("pages_dirtied")),
                   ("stored new", series("pages_stored_new"))]),
        ("new data stored\n(MiB)", [("bytes added", series("bytes_added", 2**-20))]),
        *([("disk blocks\n(MiB)", [("read", disk_mib("blocks_dirty")),
                                    ("stored new", disk_mib("blocks_new"))])]
          if any(r.get("disks") for r in records) else []),
        ("dedup hits (% of\nnon-zero copies)", [("dedup", [
            100 * (r.get("dedup_hits") or 0) / c if c else np.nan
            for r, c in zip(records, copied, strict=True)])]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 9), sharex=True)
    for ax, (label, lines) in zip(axes, panels, strict=True):
        for name, ys in lines:
            ax.plot(t, ys, ".-", label=name, markersize=4)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(loc="upper right")
    axes[-1].set_ylim(0, 100)
    axes[-1].set_xlabel(f"time since checkpoint {records[0]['id']}, "
                        f"{local_time(t0)} (s)")
    vm = (records[-1].get("target") or {}).get("name") or "?"
    fig.suptitle(f"vmckpt store {store_path}: {len(records)} checkpoints of {vm} "
                 f"({size_text(records[-1]['ram_size'])} RAM), per checkpoint")
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)

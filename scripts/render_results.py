"""Renders the README's result tables from the experiments' JSON (`vmckpt bench NAME -o DIR`
writes DIR/NAME.json), so that no table can drift from the run it shows.

Each table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in README.md;
NAME is the JSON's path under docs/results without `.json` (`qemu`, `full/qemu`).

    python scripts/render_results.py           # rewrite the blocks in README.md
    python scripts/render_results.py --check   # exit 1 if any block differs (tests do this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(
    r"(<!-- results:(?P<name>[\w/-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)

DEFAULT = "wp+pre-arm"
STRATEGIES = ("wp", "wp+pre-arm", "async", "async+pre-arm", "hybrid")
HEADS = {"wp": "wp", "wp+pre-arm": "**wp + pre-arm (default)**", "async": "async",
         "async+pre-arm": "async + pre-arm", "hybrid": "hybrid"}
GUESTS = {"wp": "wp", "wp+pre-arm": "the default", "async": "async",
          "async+pre-arm": "async + pre-arm", "hybrid": "hybrid"}  # "on X's guest"
PARTS = ("stop", "arm", "extra", "resume")  # the parts of a pause (engine/cycle.py)
LABELS = {"vmckpt wp+pre-arm (default)": "vmckpt wp + auto pre-arm (default)",
          "vmckpt wp": "vmckpt wp, no pre-arm", "vmckpt async": "vmckpt async",
          "vmckpt async+pre-arm": "vmckpt async + pre-arm", "vmckpt hybrid": "vmckpt hybrid",
          "qemu migrate (paused)": "QEMU paused `migrate` to a file",
          "qemu background-snapshot": "QEMU `background-snapshot`"}


def ms(v: float | None) -> str:
    """A duration in ms to about 3 significant digits (2 above 100, as QEMU's own)."""
    if v is None:
        return "–"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def mib(ram: str) -> str:
    """256M -> 256 MiB."""
    return f"{ram[:-1]} {ram[-1]}iB"


def guest_text(ram: str, work: str) -> str:
    """A QEMU guest as the tables name it: "256 MiB dirtying", "1 GiB idle"."""
    return f"{mib(ram)} {'dirtying' if work == 'dirty' else work}"


def ratio(v: float) -> str:
    return f"×{v:.1f}" if v < 100 else f"×{v:.0f}"


def secs(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g} s"


def kept(r: dict) -> str:
    """The interval a row kept (the mean between its pauses), and by how much it stretched
    past the one asked for if it did (the experiments flag > 1.5x)."""
    out = secs(r["interval_eff_s"])
    if r["interval_stretched"]:
        out += f", stretched ×{r['interval_eff_s'] / r['interval_s']:.3g}"
    return out


KEPT = " at the interval kept"  # in a table's head where its cells say count(r)


def count(r: dict) -> str:
    """A row's checkpoints, with the interval kept (runs before 2026-12-02 did not record it)."""
    if "interval_eff_s" not in r:
        return str(r["checkpoints"])
    if r["interval_eff_s"] is None:  # under two steady checkpoints: no interval between them
        return f"{r['checkpoints']}, too few to time"
    return f"{r['checkpoints']} at {kept(r)}"


def alone(rows: list[dict], guest: str | None = None) -> str:
    """What a slowdown divides by: the guest alone, before and after each point, per guest
    (rows[guest]'s values) if there are several (runs before 2026-12-02 measured it once, at the
    start, and say so in the text around the table)."""
    if "guest_alone_before_pages_per_s" not in rows[0]:
        return ""
    parts = []
    for g in dict.fromkeys(r[guest] if guest else None for r in rows):
        pairs = [(r["guest_alone_before_pages_per_s"], r["guest_alone_after_pages_per_s"])
                 for r in rows if not guest or r[guest] == g]
        every = [v for pair in pairs for v in pair]
        apart = max(abs(a - b) / min(a, b) for a, b in pairs)
        parts.append(f"{f'{g}: ' if g else ''}{min(every) / 1e3:.0f}–{max(every) / 1e3:.0f} k "
                     f"pages/s, the two of one point up to {100 * apart:.0f} % apart")
    return ("\nGuest alone, measured just before and just after each point (each slowdown is "
            f"against the mean of its two): {'; '.join(parts)}.\n")


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def source(doc: dict, name: str) -> str:
    how = f"`{doc['command'].replace('DIR', 'docs/results' + ('/full' if doc['full'] else ''))}`"
    note = f"{doc['date']}, {doc['seconds']} s"
    if doc.get("converted_from"):
        note += "; figures as that run's Markdown table gave them (3 significant digits)"
    return f"\n<sub>Rendered from [docs/results/{name}.json](docs/results/{name}.json) " \
           f"({how}, {note}) by scripts/render_results.py.</sub>\n"


def _by(rows: list[dict], **match: object) -> dict:
    return next(r for r in rows if all(r[k] == v for k, v in match.items()))


def qemu(doc: dict) -> str:
    """Target 3, one guest: every strategy and QEMU's two snapshots, with the ratios."""
    rows = doc["rows"]
    if "guest" in rows[0]:
        return qemu_guests(doc)
    (ram, work), = {(r["ram"], r["work"]) for r in rows}
    parts = "stop_p50_ms" in rows[0]  # runs before 2026-12-01 evening did not split the pause
    out = []
    for kind in LABELS:
        r = _by(rows, kind=kind)
        pause = f"{ms(r['pause_p50_ms'])} / {ms(r['pause_p99_ms'])} ms"
        if kind == "qemu background-snapshot":
            pause += " (its downtime)"
        cells = [LABELS[kind], pause, f"{ms(r['total_p50_ms'])} ms",
                 f"{r['MB_per_checkpoint']:.3g}", ratio(r["migrate_pause_x"]),
                 ratio(r["bgsnap_bytes_x"])]
        if kind == f"vmckpt {DEFAULT} (default)":
            cells = [f"**{c}**" if i in (0, 1, 4, 5) else c for i, c in enumerate(cells)]
        if parts:
            cells.append(" + ".join(ms(r[f"{p}_p50_ms"]) for p in PARTS)
                         if r["stop_p50_ms"] is not None else "–")
        out.append(cells + [str(r["n"])])
    head = [guest_text(ram, work), "pause p50 / p99", "total",
            "MB per checkpoint", "paused migrate's pause ÷ this",
            "background-snapshot's bytes ÷ these",
            *(["pause parts p50 ms: stop + arm + device state + cont"] if parts else []), "n"]
    return table(head, out)


def _qemu_rows(rows: list[dict]) -> list[tuple[str, dict]]:
    """(label, row) of a run that names each row's guest: vmckpt's, then QEMU's on each guest
    it ran on."""
    mine = [(LABELS[k], _by(rows, kind=k)) for k in LABELS if k.startswith("vmckpt")]
    return mine + [(f"{LABELS[r['kind']]} on {GUESTS[r['guest']]}'s guest", r) for r in rows
                   if r["kind"].startswith("qemu")]


def spread(r: dict) -> str:
    """Pause p50 / p99 and, in brackets, min–max."""
    return (f"{ms(r['pause_p50_ms'])} / {ms(r['pause_p99_ms'])} ms "
            f"({ms(r['pause_min_ms'])}–{ms(r['pause_max_ms'])})")


def ratios_note(rows: list[dict]) -> str:
    """Which QEMU figures each row's ratios divide by (bench/lab/experiments.py: the same guest's,
    or for a strategy QEMU did not run beside, the default's guest's)."""
    on = list(dict.fromkeys(r["guest"] for r in rows if r["kind"].startswith("qemu")))
    others = {r["ratios_vs_guest"] for r in rows if r["guest"] not in on}
    note = (f"\nThe ratios of {' and '.join(f'{GUESTS[g]}' for g in on)} divide by QEMU's "
            "figures on the same guest")
    if others:
        note += f"; the other strategies' by those on {GUESTS[others.pop()]}'s guest"
    return note + ".\n"


def qemu_guests(doc: dict) -> str:
    """qemu for runs that took QEMU's snapshots on more than one guest: p50 / p99 (min–max),
    the interval each kept, the ratios against QEMU on the same guest."""
    rows = doc["rows"]
    (ram, work), = {(r["ram"], r["work"]) for r in rows}
    out = []
    for label, r in _qemu_rows(rows):
        pause = spread(r) + (" (its downtime)" if r["kind"] == "qemu background-snapshot" else "")
        cells = [label, pause, f"{ms(r['total_p50_ms'])} ms", f"{r['MB_per_checkpoint']:.3g}",
                 kept(r), ratio(r["migrate_pause_x"]), ratio(r["bgsnap_bytes_x"])]
        if r["kind"] == f"vmckpt {DEFAULT} (default)":
            cells = [f"**{c}**" if i in (0, 1, 5, 6) else c for i, c in enumerate(cells)]
        cells.append(" + ".join(ms(r[f"{p}_p50_ms"]) for p in PARTS)
                     if r["stop_p50_ms"] is not None else "–")
        out.append(cells + [str(r["n"])])
    head = [guest_text(ram, work),
            "pause p50 / p99 (min–max)", "total", "MB per checkpoint", "interval kept",
            "paused migrate's pause ÷ this", "background-snapshot's bytes ÷ these",
            "pause parts p50 ms: stop + arm + device state + cont", "n"]
    return table(head, out) + ratios_note(rows) + broke_note(rows)


def qemu_full(doc: dict) -> str:
    """Target 3 at every guest of the full run: one line a guest. Runs that took QEMU's
    snapshots on more than one guest: QEMU's figures on the default's guest, min–max, paused
    migrate on wp's guest and the intervals kept too."""
    rows = doc["rows"]
    guests = "guest" in rows[0]
    on = {"guest": DEFAULT} if guests else {}
    pause = spread if guests else lambda r: f"{ms(r['pause_p50_ms'])} / {ms(r['pause_p99_ms'])} ms"
    out = []
    for ram, work in dict.fromkeys((r["ram"], r["work"]) for r in rows):
        mine = [r for r in rows if (r["ram"], r["work"]) == (ram, work)]
        d = _by(mine, kind=f"vmckpt {DEFAULT} (default)")
        mig = _by(mine, kind="qemu migrate (paused)", **on)
        bg = _by(mine, kind="qemu background-snapshot", **on)
        others = [f"{ms(_by(mine, kind=f'vmckpt {s}')['pause_p50_ms'])} ms" for s in STRATEGIES
                  if s != DEFAULT]
        cells = [guest_text(ram, work),
                 f"**{pause(d)}, {d['MB_per_checkpoint']:.2g} MB**", *others,
                 f"{pause(mig)}, {mig['MB_per_checkpoint']:.0f} MB",
                 f"{ms(bg['pause_p50_ms'])} ms (total {ms(bg['total_p50_ms'])} ms), "
                 f"{bg['MB_per_checkpoint']:.0f} MB",
                 f"{ratio(d['migrate_pause_x'])}, {ratio(d['bgsnap_bytes_x'])}"]
        if guests:
            cells += [pause(_by(mine, kind="qemu migrate (paused)", guest="wp")),
                      " / ".join(kept(r) for r in (d, mig, bg))]
        out.append(cells + [f"{d['n']} / {mig['n']}" + (f" / {bg['n']}" if guests else "")])
    where = " (the default's guest)" if guests else ""
    head = ["guest", "**default: pause p50 / p99" + (" (min–max)" if guests else "") + ", MB**",
            "wp", "async", "async + pre-arm", "hybrid",
            f"QEMU paused migrate p50 / p99{' (min–max)' if guests else ''}{where}",
            f"QEMU background-snapshot{where}",
            "ratios (migrate pause ÷ default's, background bytes ÷ default's)",
            *(["QEMU paused migrate on wp's guest",
               "interval kept (default / migrate / background-snapshot)"] if guests else []),
            "n (vmckpt / QEMU" + (" migrate / background-snapshot)" if guests else ")")]
    return table(head, out) + broke_note(rows)


def broke_note(rows: list[dict]) -> str:
    """Where QEMU stopped taking its snapshots before the count asked for, and why."""
    notes = [f"{LABELS[r['kind']]} on {GUESTS[r['guest']]}'s guest, "
             f"{guest_text(r['ram'], r['work'])}: QEMU took {r['n']} ("
             f"{r['qemu_broke']}; QEMU 7.2's background-snapshot had ended with "
             "\"bg_migration_iteration_finish: Unknown ending state\" and left its migration "
             "state behind)" for r in rows if r.get("qemu_broke")]
    return "".join(f"\n{n}.\n" for n in notes)


def _per_interval(doc: dict, cell: Callable[[dict], str], first: str) -> str:
    rows = doc["rows"]
    present = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    out = [[f"{i:g} s", *(cell(_by(rows, strategy=s, interval_s=i)) for s in present)]
           for i in dict.fromkeys(r["interval_s"] for r in rows)]
    return table([first, *(HEADS[s] for s in present)], out)


def interval(doc: dict) -> str:
    """Synthetic guest: pause p50 (hybrid: + its switch pause), slowdown, checkpoints."""
    def cell(r: dict) -> str:
        pause = ms(r["pause_p50_ms"]) + (f" + {ms(r['switch_p50_ms'])}"
                                         if r["switch_p50_ms"] is not None else "")
        return f"{pause} ms, {100 * r['slowdown']:.0f} % ({count(r)})"
    return _per_interval(doc, cell, "interval (pause p50, slowdown, checkpoints"
                         f"{KEPT * ('interval_eff_s' in doc['rows'][0])})") + alone(doc["rows"])


def qemu_interval(doc: dict) -> str:
    """QEMU test guest: pause p50 / p99 (hybrid: + its switch pause's p50), checkpoints."""
    def cell(r: dict) -> str:
        switch = f" + {ms(r['switch_p50_ms'])}" if r["switch_p50_ms"] is not None else ""
        return f"{ms(r['pause_p50_ms'])} / {ms(r['pause_p99_ms'])}{switch} ({count(r)})"
    return _per_interval(doc, cell, "interval (pause p50 / p99 ms, checkpoints"
                         f"{KEPT * ('interval_eff_s' in doc['rows'][0])})")


def scaling(doc: dict) -> str:
    """Pause and drain p50 per RAM size and strategy, with the dirty set per checkpoint."""
    rows = doc["rows"]
    rams = list(dict.fromkeys(r["ram"] for r in rows))
    present = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    out = []
    for s in present:
        cells = []
        for ram in rams:
            r = _by(rows, strategy=s, ram=ram)
            switch = f" + {ms(r['switch_p50_ms'])}" if r["switch_p50_ms"] is not None else ""
            cells.append(f"{ms(r['pause_p50_ms'])}{switch} / {ms(r['drain_p50_ms'])} ms, "
                         f"{r['dirtied_p50'] / 1e3:.1f} k ({count(r)})")
        out.append([HEADS[s], *cells])
    return table(["pause p50 (+ switch) / drain p50, dirtied p50 (checkpoints"
                  f"{KEPT * ('interval_eff_s' in rows[0])})",
                  *(mib(ram) for ram in rams)], out)


def hugepages(doc: dict) -> str:
    rows = doc["rows"]
    out = [[f"{i:g} s", *(
        f"{ms(r['pause_p50_ms'])} / {ms(r['pause_p99_ms'])} ms, drain {ms(r['drain_p50_ms'])} "
        f"ms, {100 * r['slowdown']:.0f} % ({count(r)})"
        for r in (_by(rows, pages=p, interval_s=i) for p in ("4K", "2M")))]
        for i in dict.fromkeys(r["interval_s"] for r in rows)]
    head = ["interval", "4 KiB pages: pause p50 / p99, drain p50, slowdown (checkpoints"
            f"{KEPT * ('interval_eff_s' in rows[0])})", "2 MiB pages"]
    return table(head, out) + alone(rows, "pages")


def priority(doc: dict) -> str:
    out = []
    for r in doc["rows"]:
        owed = r["cow_copies"] + r["copier_copies"]
        out.append([str(r["copiers"]), "on" if r["priority"] else "off",
                    f"{100 * r['cow_copies'] / max(1, owed):.1f} % ({r['cow_copies']:,} of "
                    f"{owed:,})", f"{r['guest_pages_per_s'] / 1e3:.0f} k",
                    f"{ms(r['pause_p50_ms'])} ms", count(r)])
    return table(["copiers", "priority", "owed pages copied on the guest's fault",
                  "guest pages/s", "pause p50",
                  f"checkpoints{KEPT * ('interval_eff_s' in doc['rows'][0])}"], out)


def dedup(doc: dict) -> str:
    rows = doc["rows"]
    keys = ("pages_dirtied", "pages_stored_new", "dedup_hits", "zero_pages", "bytes_added")
    t = {k: sum(r[k] for r in rows) for k in keys}
    pauses = sorted(r["pause_ms"] for r in rows)
    share = lambda k: f"{t[k]:,} ({100 * t[k] / t['pages_dirtied']:.1f} %)"  # noqa: E731
    head = ["checkpoints", "pages dirtied", "stored new", "dedup hits", "zero pages", "added",
            "pause p50"]
    cells = [str(len(rows)), f"{t['pages_dirtied']:,}", share("pages_stored_new"),
             share("dedup_hits"), share("zero_pages"), f"{t['bytes_added'] / 1e9:.2f} GB",
             f"{ms(pauses[len(pauses) // 2])} ms"]
    if "interval_eff_s" in rows[0]:  # each row's: since the checkpoint before it
        gaps = [r for r in rows if r["interval_eff_s"] is not None]
        stretched = sum(r["interval_stretched"] for r in gaps)
        head.append("interval asked / kept (mean)")
        cells.append(f"{secs(rows[0]['interval_s'])} / "
                     f"{secs(sum(r['interval_eff_s'] for r in gaps) / len(gaps))} ({stretched} "
                     f"of {len(gaps)} gaps stretched)")
    return table(head, [cells])


def pause(doc: dict) -> str:
    """bench/bench_pause.py (pytest-benchmark's JSON): the engine's pause vs a bare one."""
    out = []
    for b in doc["benchmarks"]:
        x = b["extra_info"]
        out.append([mib(x["ram"]), f"{100 * x['dirty_share']:.3g} %",
                    f"{x['pause_median_ms']:.2f} ms",
                    f"{x['bare_stop_wp_cont_median_ms']:.2f} ms ({x['bare_wp_runs']:,})",
                    f"×{x['ratio']:.2f}"])
    sizes = ",".join(b["extra_info"]["ram"] for b in doc["benchmarks"])
    return table(["guest RAM", "dirty", "engine pause (SIGSTOP, arm, SIGCONT)",
                  "bare (its UFFDIO_WRITEPROTECT calls)", "engine ÷ bare"], out) + (
        f"\n<sub>Rendered from [docs/results/pause.json](docs/results/pause.json) "
        f"(`VMCKPT_BENCH_SIZES={sizes} .venv/bin/pytest bench/bench_pause.py --benchmark-only "
        f"-s --benchmark-json=docs/results/pause.json`, {doc['datetime'][:10]}; medians of "
        f"{doc['benchmarks'][0]['stats']['rounds']} rounds each) by "
        "scripts/render_results.py.</sub>\n")


def drain(doc: dict) -> str:
    """bench/bench_drain.py (pytest-benchmark's JSON): each round's drains and the limits
    measured in that round, each ratio a drain over a limit of its own round."""
    x = doc["benchmarks"][0]["extra_info"]
    copiers = sorted(x["median_round"], key=int)
    out = [[str(i), *(f"{r[f'drain_{n}']:.0f} MB/s (×{r[f'drain_{n}_over_ingest']:.2f}, "
                      f"×{r[f'drain_{n}_over_memcpy_hash']:.2f})" for n in copiers),
            f"{r['ingest']:.0f} MB/s", f"{r['memcpy_hash']:.0f} MB/s", f"{r['disk']:.0f} MB/s"]
           for i, r in enumerate(x["rounds"], 1)]
    head = ["round", *(f"drain, {n} copier{'s' * (int(n) > 1)} (÷ bare ingest, ÷ memcpy+SHA-256 "
                       "of the same round)" for n in copiers),
            "bare RocksDB ingest", "memcpy+SHA-256, 1 thread", "raw disk write"]
    return table(head, out) + (
        f"\n<sub>Rendered from [docs/results/drain.json](docs/results/drain.json) "
        f"(`.venv/bin/pytest bench/bench_drain.py --benchmark-only -s "
        f"--benchmark-json=docs/results/drain.json`, {doc['datetime'][:10]}; {x['size']} of "
        "distinct pages) by scripts/render_results.py.</sub>\n")


RENDER: dict[str, Callable[[dict], str]] = {
    "qemu": qemu, "interval": interval, "qemu-interval": qemu_interval, "scaling": scaling,
    "hugepages": hugepages, "priority": priority, "dedup": dedup}


def block(name: str, results: Path = RESULTS) -> str:
    """The rendered body of block NAME: the table, then where it comes from."""
    doc = json.loads((results / f"{name}.json").read_text())
    if "benchmarks" in doc:  # a pytest-benchmark suite's --benchmark-json
        return drain(doc) if name.rsplit("/", 1)[-1] == "drain" else pause(doc)
    exp = name.rsplit("/", 1)[-1]
    render = qemu_full if exp == "qemu" and len({(r["ram"], r["work"]) for r in
                                                 doc["rows"]}) > 1 else RENDER[exp]
    return render(doc) + source(doc, name)


def render(readme: str, results: Path = RESULTS) -> str:
    """readme with every results block replaced by its rendering."""
    return BLOCK.sub(lambda m: m[1] + block(m["name"], results) + m[4], readme)


def blocks(readme: str) -> dict[str, str]:
    """The bodies of readme's results blocks, by name."""
    return {m["name"]: m["body"] for m in BLOCK.finditer(readme)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only say whether README.md is current")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args()
    text = args.readme.read_text()
    new = render(text)
    if args.check:
        stale = [n for n, body in blocks(text).items() if blocks(new)[n] != body]
        for n in stale:
            print(f"{args.readme}: block results:{n} differs from docs/results/{n}.json",
                  file=sys.stderr)
        return 1 if stale else 0
    args.readme.write_text(new)
    print(f"rendered {len(blocks(new))} blocks into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

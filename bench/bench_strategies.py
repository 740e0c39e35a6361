"""The strategies side by side: pause and guest slowdown vs interval, data per checkpoint of a
duplicate-heavy guest, and scaling with RAM size (vmckpt.lab.experiments).

    .venv/bin/pytest bench/bench_strategies.py --benchmark-only -s
    (or `vmckpt bench interval|dedup|priority|scaling -o DIR` for Markdown tables and plots)
"""

from __future__ import annotations

import asyncio

from vmckpt.lab.experiments import (
    dedup_experiment,
    dedup_summary,
    interval_experiment,
    priority_experiment,
    scaling_experiment,
)


def _run(benchmark, experiment, tmp_path, **kw) -> list[dict]:
    rows: list[dict] = []
    benchmark.pedantic(lambda: rows.extend(asyncio.run(experiment(tmp_path, **kw))),
                       rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    return rows


def test_pause_and_slowdown_vs_interval(benchmark, tmp_path):
    rows = _run(benchmark, interval_experiment, tmp_path)
    for r in rows:
        print(f"  {r['strategy']:6s} {r['interval_s']:5.2f} s (kept {r['interval_eff_s']:5.2f} s"
              f"{', stretched' * r['interval_stretched']}; alone before / after "
              f"{r['guest_alone_before_pages_per_s']:.0f} / "
              f"{r['guest_alone_after_pages_per_s']:.0f} pages/s): pause "
              f"{r['pause_p50_ms']:6.2f} / {r['pause_p99_ms']:6.2f} ms, "
              f"{r['dirtied_p50']:7.0f} pages dirtied, guest "
              f"{r['guest_pages_per_s']:7.0f} pages/s, slowdown {r['slowdown']:.0%}, switch "
              f"pause {r['switch_p50_ms']:.2f} ms")


def test_data_per_checkpoint_and_dedup(benchmark, tmp_path):
    s = dedup_summary(_run(benchmark, dedup_experiment, tmp_path))
    print(f"\n{s['checkpoints']} checkpoints, {s['pages_dirtied']} pages dirtied: "
          f"{s['pages_stored_new']} stored, {s['dedup_hits']} dedup hits, {s['zero_pages']} "
          f"zero pages ({s['saved_share']:.0%} not stored); {s['bytes_added'] / 1e6:.1f} MB")


def test_copiers_and_priority(benchmark, tmp_path):
    for r in _run(benchmark, priority_experiment, tmp_path):
        share = r["cow_copies"] / max(1, r["cow_copies"] + r["copier_copies"])
        print(f"  copiers {r['copiers']} priority {r['priority']!s:5s}: {share:5.1%} of owed "
              f"pages copied on a fault, guest {r['guest_pages_per_s']:.0f} pages/s, pause "
              f"{r['pause_p50_ms']:.1f} ms")


def test_scaling_with_ram_size(benchmark, tmp_path):
    for r in _run(benchmark, scaling_experiment, tmp_path):
        print(f"  {r['ram']:5s} {r['strategy']:5s}: pause {r['pause_p50_ms']:6.2f} ms, drain "
              f"{r['drain_p50_ms']:6.1f} ms, {r['dirtied_p50']:.0f} pages dirtied")

"""The README's result tables are exactly what scripts/render_results.py makes of the committed
docs/results/*.json: a table edited by hand, or a JSON re-run without re-rendering, fails."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

from vmckpt.cli.bench import dumps, results
from vmckpt.lab.experiments import DEFAULT_STRATEGY, STRATEGIES, interval_kept

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("render_results",
                                              ROOT / "scripts" / "render_results.py")
assert spec and spec.loader
render_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_results)


def test_readme_tables_are_rendered_from_the_committed_json():
    readme = (ROOT / "README.md").read_text()
    have = render_results.blocks(readme)
    # Every experiment's table, reduced and full, is one of them.
    assert {"qemu", "interval", "qemu-interval", "scaling", "hugepages", "priority",
            "dedup", "full/qemu", "pause"} <= set(have)
    want = render_results.blocks(render_results.render(readme))
    for name, body in have.items():
        assert body == want[name], (
            f"README block results:{name} is not what docs/results/{name}.json renders to: "
            "run python scripts/render_results.py")


def test_bench_json_keeps_every_figure(tmp_path):
    # What `vmckpt bench` writes is what the renderer reads: NaN (not measured) becomes null,
    # everything else survives the round trip.
    rows = [{"strategy": "hybrid", "interval_s": 0.5, "pause_p50_ms": 26.2137,
             "pause_p99_ms": 30.7, "switch_p50_ms": 21.7, "checkpoints": 8},
            {"strategy": "wp", "interval_s": 0.5, "pause_p50_ms": 10.04,
             "pause_p99_ms": 10.7, "switch_p50_ms": math.nan, "checkpoints": 8}]
    doc = json.loads(dumps(results("qemu-interval", rows, full=False, seconds=12.3)))
    assert doc["rows"][0] == rows[0]
    assert doc["rows"][1]["switch_p50_ms"] is None
    assert doc["command"] == "vmckpt bench qemu-interval -o DIR" and doc["seconds"] == 12
    (tmp_path / "qemu-interval.json").write_text(json.dumps(doc))
    out = render_results.block("qemu-interval", tmp_path)
    assert "| 0.5 s | 10.0 / 10.7 (8) | 26.2 / 30.7 + 21.7 (8) |" in out


def test_vmckpt_bench_writes_the_json_the_readme_is_rendered_from(tmp_path):
    # The shortest experiment, for real: its JSON has every checkpoint's row and renders.
    vmckpt = str(Path(sys.executable).with_name("vmckpt"))
    out = subprocess.run([vmckpt, "bench", "dedup", "-o", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "dedup.json").read_text())
    assert doc["experiment"] == "dedup" and doc["full"] is False and doc["seconds"] > 0
    assert [r["id"] for r in doc["rows"]] == list(range(1, 101))
    dirtied = sum(r["pages_dirtied"] for r in doc["rows"])
    assert dirtied > 0
    assert f"| 100 | {dirtied:,} |" in render_results.block("dedup", tmp_path)
    assert (tmp_path / "dedup.md").exists() and (tmp_path / "dedup.png").exists()


def test_interval_kept_is_the_mean_between_pauses_and_says_when_it_stretched():
    # Two set-up checkpoints (skipped), then pauses 0.3 s apart.
    records = [{"time": t} for t in (100.0, 100.1, 100.2, 100.5, 100.8, 101.1)]
    kept = interval_kept(records, 0.25)
    assert kept["interval_s"] == 0.25 and math.isclose(kept["interval_eff_s"], 0.3)
    assert kept["interval_stretched"] is False  # 1.2x: not a clear margin
    assert interval_kept(records, 0.1)["interval_stretched"] is True  # 3x
    assert math.isnan(interval_kept(records[:3], 0.1)["interval_eff_s"])  # one steady pause


def _rendered(tmp_path, name: str, rows: list[dict]) -> str:
    (tmp_path / f"{name}.json").write_text(dumps(results(name, rows, full=False, seconds=1)))
    return render_results.block(name, tmp_path)


def _point(interval: float, eff: float, **kw: object) -> dict:
    return {"interval_s": interval, "interval_eff_s": eff,
            "interval_stretched": eff > 1.5 * interval,
            "checkpoints": 10, "pause_p50_ms": 10.0, "pause_p99_ms": 20.0,
            "switch_p50_ms": math.nan, "dirtied_p50": 1000.0, "drain_p50_ms": 100.0, **kw}


def test_rows_show_the_interval_kept_and_the_alone_rate_around_each_point(tmp_path):
    rows = [_point(0.1, 0.62, strategy="async", guest_pages_per_s=60e3,
                   guest_alone_before_pages_per_s=190e3, guest_alone_after_pages_per_s=150e3,
                   guest_off_pages_per_s=170e3, slowdown=1 - 60 / 170),
            _point(0.5, 0.51, strategy="async", guest_pages_per_s=100e3,
                   guest_alone_before_pages_per_s=150e3, guest_alone_after_pages_per_s=160e3,
                   guest_off_pages_per_s=155e3, slowdown=1 - 100 / 155)]
    out = _rendered(tmp_path, "interval", rows)
    assert "| 0.1 s | 10.0 ms, 65 % (10 at 0.62 s, stretched ×6.2) |" in out
    assert "| 0.5 s | 10.0 ms, 35 % (10 at 0.51 s) |" in out
    assert "checkpoints at the interval kept" in out
    untimed = [rows[0], {**rows[1], "interval_eff_s": math.nan, "interval_stretched": False}]
    assert "| 0.5 s | 10.0 ms, 35 % (10, too few to time) |" in _rendered(tmp_path, "interval",
                                                                          untimed)
    assert "150–190 k pages/s, the two of one point up to 27 % apart." in out
    huge = [{**r, "pages": p} for r in rows for p in ("4K", "2M")]
    out = _rendered(tmp_path, "hugepages", [{k: v for k, v in r.items() if k != "strategy"}
                                            for r in huge])
    assert "drain 100 ms, 65 % (10 at 0.62 s, stretched ×6.2) |" in out
    assert "4K: 150–190 k pages/s, the two of one point up to 27 % apart; 2M: " in out
    for name in ("qemu-interval", "scaling"):
        out = _rendered(tmp_path, name, [{**rows[0], "ram": "256M"}])
        assert "(10 at 0.62 s, stretched ×6.2)" in out and "at the interval kept" in out


def test_dedup_says_how_many_gaps_stretched(tmp_path):
    rows = [{"id": n + 1, "interval_s": 0.1, "interval_eff_s": eff,
             "interval_stretched": eff is not None and eff > 0.15, "pages_dirtied": 10,
             "pages_stored_new": 4, "dedup_hits": 4, "zero_pages": 2, "bytes_added": 4096 * 4,
             "pause_ms": 8.0} for n, eff in enumerate((None, 0.1, 0.3, 0.2))]
    out = _rendered(tmp_path, "dedup", rows)
    assert "| 0.1 s / 0.2 s (2 of 3 gaps stretched) |" in out


def _qemu_row(kind: str, guest: str, p50: float, mb: float, **kw: object) -> dict:
    return {"ram": "256M", "work": "dirty", "guest": guest, "kind": kind, "n": 15,
            "pause_p50_ms": p50, "pause_p99_ms": 3 * p50, "pause_min_ms": p50 / 2,
            "pause_max_ms": 4 * p50, "total_p50_ms": 2 * p50, "MB_per_checkpoint": mb,
            "interval_s": 1.0, "interval_eff_s": 1.01, "interval_stretched": False,
            **{f"{p}_p50_ms": math.nan for p in ("stop", "arm", "extra", "resume")}, **kw}


def test_qemu_snapshots_on_two_guests_each_ratio_against_its_own(tmp_path):
    rows = []
    for s in STRATEGIES:
        default = " (default)" if s == DEFAULT_STRATEGY else ""
        rows.append(_qemu_row(f"vmckpt {s}{default}", s, 10.0, 20.0))
        if s in ("wp", DEFAULT_STRATEGY):
            rows.append(_qemu_row("qemu migrate (paused)", s, 100.0 if s == "wp" else 200.0,
                                  134.0))
            rows.append(_qemu_row("qemu background-snapshot", s, 20.0, 134.0,
                                  interval_eff_s=1.6, interval_stretched=True))
    for r in rows:
        on = r["guest"] if r["guest"] in ("wp", DEFAULT_STRATEGY) else DEFAULT_STRATEGY
        mig = next(q for q in rows if q["guest"] == on and q["kind"] == "qemu migrate (paused)")
        r.update(ratios_vs_guest=on, migrate_pause_x=mig["pause_p50_ms"] / r["pause_p50_ms"],
                 bgsnap_bytes_x=134.0 / r["MB_per_checkpoint"])
    out = _rendered(tmp_path, "qemu", rows)
    assert ("| **vmckpt wp + auto pre-arm (default)** | **10.0 / 30.0 ms (5.0–40.0)** | 20.0 ms "
            "| 20 | 1.01 s | **×20.0** | **×6.7** |") in out
    assert "| vmckpt wp, no pre-arm | 10.0 / 30.0 ms (5.0–40.0) | 20.0 ms | 20 | 1.01 s | ×10.0 |" \
        in out
    assert "| QEMU paused `migrate` to a file on wp's guest | 100 / 300 ms (50.0–400)" in out
    assert ("| QEMU paused `migrate` to a file on the default's guest | 200 / 600 ms (100–800)"
            in out)
    assert ("| QEMU `background-snapshot` on the default's guest | 20.0 / 60.0 ms (10.0–80.0) "
            "(its downtime) | 40.0 ms | 134 | 1.6 s, stretched ×1.6 |") in out
    assert ("The ratios of wp and the default divide by QEMU's figures on the same guest; "
            "the other strategies' by those on the default's guest.") in out
    # The full run's one line a guest: QEMU's figures on the default's guest, wp's beside.
    rows += [{**r, "ram": "1G"} for r in rows]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "qemu.json").write_text(dumps(results("qemu", rows, full=True,
                                                               seconds=1)))
    out = render_results.block("full/qemu", tmp_path)
    assert ("| 1 GiB dirtying | **10.0 / 30.0 ms (5.0–40.0), 20 MB** | 10.0 ms | 10.0 ms | "
            "10.0 ms | 10.0 ms | 200 / 600 ms (100–800), 134 MB |") in out
    assert "| ×20.0, ×6.7 | 100 / 300 ms (50.0–400) | 1.01 s / 1.01 s / 1.6 s, stretched ×1.6 |" \
        in out


def test_drain_ratios_each_divide_by_the_limits_of_their_own_round(tmp_path):
    def one(d1: float, d2: float, ingest: float) -> dict:
        r = {"drain_1": d1, "drain_2": d2, "memcpy_hash": 1000.0, "ingest": ingest,
             "disk": 1500.0}
        for n in (1, 2):
            r |= {f"drain_{n}_over_ingest": r[f"drain_{n}"] / ingest,
                  f"drain_{n}_over_memcpy_hash": r[f"drain_{n}"] / 1000.0}
        return r

    rounds = [one(343.0, 357.0, 401.0), one(246.0, 211.0, 182.0)]
    doc = {"datetime": "2026-12-02T03:00:00", "benchmarks": [{"extra_info": {
        "size": "256M", "rounds": rounds, "median_round": {"1": {}, "2": {}}}}]}
    (tmp_path / "drain.json").write_text(json.dumps(doc))
    out = render_results.block("drain", tmp_path)
    assert "| 1 | 343 MB/s (×0.86, ×0.34) | 357 MB/s (×0.89, ×0.36) | 401 MB/s |" in out
    assert "| 2 | 246 MB/s (×1.35, ×0.25) | 211 MB/s (×1.16, ×0.21) | 182 MB/s |" in out
    assert "--benchmark-json=docs/results/drain.json" in out

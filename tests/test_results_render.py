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

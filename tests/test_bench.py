"""bench.py's CPU group runs end to end on tiny shapes, so the benchmark cannot rot."""

import json
import subprocess
import sys
from pathlib import Path


def test_bench_cpu_dry_run(tmp_path):
    out = tmp_path / "bench.jsonl"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench.py"), "--cpu", "--dry", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cases = {row.get("case") for row in rows}
    assert {"ceilings", "lm_prefill_32tok", "lm_decode_32tok", "vit_224px", "loader_512tok",
            "load_rss_4_shards"} <= cases
    assert not [row for row in rows if row.get("impl") == "error"]

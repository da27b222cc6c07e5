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


def test_bench_memory_model_dry(tmp_path):
    """bench.py's memory section (part of --gpu) on the CPU: the FSDP2 pre-training step runs for
    stage 1 (towers frozen) and stage 3 (all trainable) on the tiny config, each row carries
    training.memory_estimate_gib's terms for exactly that config, stage and row length, nothing
    is claimed as measured, and the step's loss is that of a fresh model: ln(vocabulary)."""
    import math
    import time

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("the dry memory step runs on the CPU; with a GPU, `bench.py --gpu` measures it")
    import bench
    import training
    b = bench.Bench(device=torch.device("cpu"), dry=True, out_path=str(tmp_path / "bench.jsonl"),
                    deadline=time.time() + 600)
    bench.bench_memory_model(b)
    rows = [row for row in b.rows if row.get("impl") == "fsdp2_step"]
    assert [row["case"] for row in rows] == ["stage 1, 128 tok", "stage 3, 128 tok"], b.rows
    cfg = bench.memory_config(dry=True)
    for row, trainable in zip(rows, [("projector",), ("vit", "projector", "llm")]):
        est = training.memory_estimate_gib(cfg, 1, 128, trainable, 0.5)
        assert row["estimate_gib"] == round(est["total"], 3)
        assert row["terms"] == {k: round(v, 3) for k, v in est.items() if k != "total"}
        assert "peak_gib" not in row and "ratio" not in row
        assert abs(row["loss"] - math.log(cfg.text.vocab_size)) < 0.01, row
    assert json.loads((tmp_path / "bench.jsonl").read_text().splitlines()[-1])["impl"] == "summary"

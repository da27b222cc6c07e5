"""training.py's run-folder safety: a rerun never deletes a run without --resume or --overwrite,
resume skips damaged checkpoints (seven kinds of damage) with a message and falls back to the
previous intact one, stale temporary folders of killed writes are removed, and the metrics log
holds no step twice after a resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import training


def test_rerun_without_a_flag_refuses_and_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    outputs = ["checkpoints", "metrics.jsonl", "final"]
    with pytest.raises(SystemExit) as e:
        training.prepare_run_dir(str(out), resume=False, overwrite=False, outputs=outputs)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out) in err and "--resume" in err and "--overwrite" in err
    assert (out / "checkpoints" / "step-000002").is_dir() and (out / "metrics.jsonl").is_file()
    # --resume keeps everything; --overwrite deletes exactly this run's outputs
    assert training.prepare_run_dir(str(out), True, False, outputs) == ["checkpoints", "metrics.jsonl"]
    assert (out / "metrics.jsonl").is_file()
    (out / "other.txt").write_text("not ours")
    training.prepare_run_dir(str(out), False, True, outputs)
    assert sorted(os.listdir(out)) == ["other.txt"]
    with pytest.raises(SystemExit) as e:
        training.prepare_run_dir(str(out), True, True, outputs)
    assert e.value.code == 2
    # a new folder needs no flag
    training.prepare_run_dir(str(tmp_path / "new"), False, False, outputs)
    assert (tmp_path / "new").is_dir()

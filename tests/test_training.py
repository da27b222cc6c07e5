"""training.py's run-folder safety: a rerun never deletes a run without --resume or --overwrite,
resume skips damaged checkpoints (seven kinds of damage) with a message and falls back to the
previous intact one, stale temporary folders of killed writes are removed, and the metrics log
holds no step twice after a resume."""

import contextlib
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


def fake_checkpoint(root, step, world_size=1):
    """The files save_training_state writes, with tiny tensors."""
    path = os.path.join(root, f"step-{step:06d}")
    os.makedirs(path)
    save_file({"w": torch.ones(3)}, os.path.join(path, "model.safetensors"))
    save_file({"w::exp_avg": torch.zeros(3)}, os.path.join(path, "optimizer.safetensors"))
    save_file({f"rank{r}.torch": torch.zeros(4, dtype=torch.uint8) for r in range(world_size)},
              os.path.join(path, "rng.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen2_5_vl"}, f)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"step": step, "world_size": world_size, "param_groups": [], "loader": [{}] * world_size,
                   "python_rng": [[3, [], None]] * world_size, "numpy_rng": [["MT19937", [], 0, 0, 0.0]] * world_size}, f)
    return path


def _truncate(path, keep):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:keep])


def _edit_state(path, **changes):
    with open(os.path.join(path, "trainer_state.json")) as f:
        ts = json.load(f)
    ts.update(changes)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump(ts, f)


DAMAGE = {   # kind -> (how to damage a checkpoint folder, words the message must contain)
    "missing file": (lambda p: os.remove(f"{p}/optimizer.safetensors"), "optimizer.safetensors is missing"),
    "truncated safetensors": (lambda p: _truncate(f"{p}/model.safetensors", -5), "model.safetensors: truncated"),
    "empty safetensors": (lambda p: _truncate(f"{p}/rng.safetensors", 0), "rng.safetensors: shorter"),
    "garbage safetensors header": (lambda p: open(f"{p}/model.safetensors", "r+b").write(b"\xff" * 16),
                                   "model.safetensors: header of"),
    "bad JSON": (lambda p: _truncate(f"{p}/trainer_state.json", 20), "trainer_state.json is not valid JSON"),
    "wrong step": (lambda p: _edit_state(p, step=7), "says step 7"),
    "missing rank state": (lambda p: _edit_state(p, world_size=2), "each of its 2 rank(s)"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_skips_a_damaged_latest_checkpoint(tmp_path, kind):
    root = str(tmp_path / "checkpoints")
    good = fake_checkpoint(root, 2)
    bad = fake_checkpoint(root, 4)
    assert training.checkpoint_problem(bad) is None
    damage, words = DAMAGE[kind]
    damage(bad)
    said = []
    assert training.resume_checkpoint(root, log=said.append) == good
    assert len(said) == 1 and bad in said[0] and words in said[0], said
    assert os.path.isdir(bad)                                  # kept for inspection


def test_resume_checks_extra_files_and_finds_nothing_when_all_are_damaged(tmp_path):
    root = str(tmp_path / "checkpoints")
    only = fake_checkpoint(root, 2)
    assert training.resume_checkpoint(root, required=("extra.safetensors",), log=lambda m: None) is None
    save_file({"head.w": torch.ones(2)}, f"{only}/extra.safetensors")
    assert training.resume_checkpoint(root, required=("extra.safetensors",), log=lambda m: None) == only


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_folders_of_killed_writes_are_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(str(root), 2)
    dead, alive = _dead_pid(), os.getppid()                    # the parent runs as long as we do
    (root / f"step-000004.tmp-{dead}").mkdir()                 # killed while writing
    (root / f"step-000004.tmp-{alive}").mkdir()                # another process still writing
    # killed between commit_dir's two renames: step-000006 is missing, its old version survives
    os.rename(fake_checkpoint(str(root), 6), root / f"step-000006.old-{dead}")
    (root / f"step-000006.tmp-{dead}").mkdir()
    (root / f"metrics.jsonl.tmp-{dead}").write_text("{}\n")    # JsonlLog.keep_only's temporary file
    said = []
    assert training.resume_checkpoint(str(root), log=said.append) == str(root / "step-000006")
    assert sorted(os.listdir(root)) == ["step-000002", f"step-000004.tmp-{alive}", "step-000006"]
    assert len(said) == 4 and all(str(dead) in m for m in said)


def test_jsonl_log_keeps_only_what_is_asked_and_skips_a_cut_line(tmp_path):
    log = training.JsonlLog(str(tmp_path / "metrics.jsonl"))
    for s in (1, 2, 3):
        log.write({"stage": "1", "step": s})
    log.write({"stage": "2", "step": 1})
    with open(log.path, "a") as f:
        f.write('{"stage": "2", "st')                         # a write cut by a kill
    assert len(log.records()) == 4
    log.keep_only(lambda r: r["stage"] != "1" or r["step"] <= 2)
    assert log.records() == [{"stage": "1", "step": 1}, {"stage": "1", "step": 2}, {"stage": "2", "step": 1}]


def test_low_priority_work_leaves_its_cores_to_training():
    # /proc/stat's cpu line: user nice system idle iowait irq softirq steal guest guest_nice
    line = "cpu  100 500 50 300 50 0 0 0 0 0"
    assert training.cpu_ticks(line, nice_yields=True) == (1000, 300 + 50 + 500)
    assert training.cpu_ticks(line, nice_yields=False) == (1000, 300 + 50)


def test_threads_are_picked_again_for_every_phase(monkeypatch, capsys):
    busy = iter([2.0, 3.0])
    monkeypatch.setattr(training, "busy_cores", lambda window_s=0.5: next(busy))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    compute = training.Compute(torch.device("cpu"))
    before = torch.get_num_threads()
    try:
        assert training.set_threads(compute, None, "stage 1") == 2
        assert training.set_threads(compute, None, "stage 2") == 1
        assert torch.get_num_threads() == 1
        assert training.set_threads(compute, 3, "stage 3") == 3
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("stage 1: torch CPU threads: 2 (4 cores, 2.0 busy")
    assert out[1].startswith("stage 2: torch CPU threads: 1 (4 cores, 3.0 busy")
    assert out[2] == "stage 3: torch CPU threads: 3 (from --threads)"


@pytest.mark.parametrize("args", [("bogus", "auto"), ("cpu", "fp16")])
def test_compute_init_rejects_a_bad_device_or_precision_in_one_line(args, capsys):
    with pytest.raises(SystemExit) as e:
        training.compute_init(*args, quiet=True)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and repr(args[0] if args[0] == "bogus" else args[1]) in err


def test_memory_model_counts_every_term_by_hand_at_7b():
    """The 7B stage-3 estimate on 8 GPUs, recomputed by hand from the parameter counts: the
    sharded states; no unsharded gradient (FSDP2 reduce-scatters after every micro-batch)."""
    from mimovl import MiMoVL, MiMoVLConfig
    cfg = MiMoVLConfig.preset("mimo-vl-7b")
    with torch.device("meta"):
        n = sum(p.numel() for p in MiMoVL(cfg).parameters())
    one = training.memory_estimate_gib(cfg, 8, 8192)
    gib = 2 ** 30
    assert one["weights fp32 (sharded)"] == pytest.approx(4 * n / 8 / gib)
    assert one["AdamW moments fp32 (sharded)"] == pytest.approx(8 * n / 8 / gib)
    assert one["gradients fp32 (sharded)"] == pytest.approx(4 * n / 8 / gib)
    assert not any("unsharded" in k for k in one)
    assert one["LM layer inputs bf16 (checkpointed)"] == pytest.approx(2 * 8192 * 4096 * 36 / gib)
    assert one["ViT block inputs bf16 (checkpointed)"] == pytest.approx(2 * 4 * 4096 * 1280 * 32 / gib)
    assert one["cross-entropy dWeight accumulator fp32"] == pytest.approx(4 * 151680 * 4096 / gib)
    assert one["total"] == pytest.approx(sum(v for k, v in one.items() if k != "total"))
    # a projector-only stage has no moments or gradients for the frozen towers
    proj = training.memory_estimate_gib(cfg, 8, 8192, trainable=("projector",))
    assert proj["AdamW moments fp32 (sharded)"] < 0.01 * one["AdamW moments fp32 (sharded)"]
    assert proj["cross-entropy dWeight accumulator fp32"] == 0


def test_rl_memory_model_adds_the_rollout_copy_and_kv_cache_by_hand_at_7b():
    """MORL's two phases at 7B on 8 GPUs (--recipe paper: G = 16 responses of up to 32K tokens
    after a 4K prompt): the rollout holds the gathered bf16 copy and a KV cache of
    2 (K, V) x 36 layers x 8 KV heads x 128 x 2 B per token; the update is a pre-training step."""
    from mimovl import MiMoVL, MiMoVLConfig
    cfg = MiMoVLConfig.preset("mimo-vl-7b")
    with torch.device("meta"):
        n = sum(p.numel() for p in MiMoVL(cfg).parameters())
    gib = 2 ** 30
    est = training.rl_memory_estimate_gib(cfg, 8, 36864, 16, 36864)
    roll, upd = est["rollout"], est["update"]
    assert roll["KV cache bf16 (one generate call)"] == pytest.approx(2 * 36 * 8 * 128 * 2 * 16 * 36864 / gib)
    assert roll["rollout copy bf16 (gathered)"] == pytest.approx(2 * n / gib)
    assert roll["AdamW moments fp32 (sharded)"] == pytest.approx(8 * n / 8 / gib)
    assert "gradients fp32 (sharded)" not in roll and "reward model bf16" not in roll
    assert upd["LM layer inputs bf16 (checkpointed)"] == pytest.approx(2 * 36864 * 4096 * 36 / gib)
    assert upd["ViT block inputs bf16 (checkpointed)"] == 0                  # text rows
    for phase in (roll, upd):
        assert phase["total"] == pytest.approx(sum(v for k, v in phase.items() if k != "total"))
    here = training.rl_memory_estimate_gib(cfg, 8, 36864, 16, 36864, rm_here=True)
    assert here["rollout"]["total"] - roll["total"] == pytest.approx(2 * n / gib)


def test_fill_shards_reads_a_checkpoint_into_a_meta_built_model_strictly(tmp_path):
    """One process (plain tensors: every rank's rows are all rows): a model built on the meta
    device and filled from a folder equals the folder's model, parameters given in `real` keep
    their values, and a folder of another shape is refused with every mismatch named."""
    from mimovl import MiMoVL, MiMoVLConfig
    torch.manual_seed(0)
    src = MiMoVL(MiMoVLConfig.preset("tiny"))
    src.save_pretrained(str(tmp_path / "a"))
    model = training.meta_model(str(tmp_path / "a")).to_empty(device="cpu")
    fresh = torch.randn_like(src.visual.merger.mlp[0].weight)
    training.fill_shards(model, str(tmp_path / "a"), {"visual.merger.mlp.0.weight": fresh})
    for name, p in model.state_dict().items():
        want = fresh if name == "visual.merger.mlp.0.weight" else src.state_dict()[name]
        assert torch.equal(p, want), name

    cfg = MiMoVLConfig.preset("tiny")
    cfg.text.intermediate_size += 16
    other = MiMoVL(cfg)
    other.save_pretrained(str(tmp_path / "b"))
    with pytest.raises(ValueError) as e:
        training.fill_shards(model, str(tmp_path / "b"), {})
    msg = str(e.value)
    assert "wrong shape" in msg and "model.layers.0.mlp.up_proj.weight: checkpoint (" in msg


def test_streamed_export_in_several_shards_loads_as_the_full_export(tmp_path):
    """save_stage_streamed (one tensor at a time, shards of at most max_shard_bytes, an index)
    writes the weights save_stage_folder writes from the full state dict."""
    import synthetic
    from mimovl import MiMoVL, MiMoVLConfig
    from processor import Processor
    synthetic.train_tokenizer(str(tmp_path / "tok"), vocab_size=1024, n_samples=200)
    processor = Processor.from_pretrained(str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = MiMoVL(MiMoVLConfig.preset("tiny"))
    compute = training.Compute(torch.device("cpu"))
    training.save_stage_streamed(str(tmp_path / "streamed"), model, model.cfg, processor, {"stage": "t"},
                                 compute, max_shard_bytes=4 * 2 ** 20)
    training.save_stage_folder(str(tmp_path / "full"), model.state_dict(), model.cfg, processor, {"stage": "t"})
    index = json.load(open(tmp_path / "streamed" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) >= 4
    a = MiMoVL.from_pretrained(str(tmp_path / "streamed"), progress=False).state_dict()
    b = MiMoVL.from_pretrained(str(tmp_path / "full"), progress=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path / "streamed")) == sorted(
        [f for f in os.listdir(tmp_path / "full") if f != "model.safetensors"] +
        ["model.safetensors.index.json", *set(index["weight_map"].values())])


def test_fsdp_gradients_are_reduced_after_every_micro_batch():
    """grad_sync never turns FSDP2's reduce-scatter off (that would keep the whole model's unsharded
    fp32 gradient through accumulation); DDP still skips the all-reduce until the last micro-batch."""
    calls = []

    class FSDPLike(torch.nn.Module):
        def set_requires_gradient_sync(self, sync):
            calls.append(sync)

    with training.grad_sync(FSDPLike(), False):
        pass
    assert calls == []

    class DDPLike(torch.nn.Module):
        def no_sync(self):
            calls.append("no_sync")
            return contextlib.nullcontext()

    with training.grad_sync(DDPLike(), False):
        pass
    with training.grad_sync(DDPLike(), True):
        pass
    assert calls == ["no_sync"]

"""Scale-out mechanics of training.py under `torchrun --nproc_per_node 2` (gloo, CPU): an FSDP2
stage saves sharded torch.distributed.checkpoint checkpoints; a run stopped after a checkpoint
resumes with one process and with two and gives the losses of an uninterrupted run; the stage
folder, exported one parameter at a time, loads in transformers 4.57 with matching logits; a
checkpoint without its COMPLETE marker is not resumed from; and a sharded start reads only each
rank's rows (peak memory per rank near model / 2, against a whole model for a plain load).

This file is also the worker of the memory test:
    torchrun --nproc_per_node 2 tests/test_scaleout.py --rss-worker sharded MODEL_DIR OUT_FILE
    python tests/test_scaleout.py --rss-worker whole MODEL_DIR OUT_FILE
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import synthetic  # noqa: E402
import train_pretrain as tp  # noqa: E402
import training  # noqa: E402
from mimovl import MiMoVL, MiMoVLConfig  # noqa: E402
from processor import Processor  # noqa: E402

# stage 3 (everything trainable) from a small start folder, on a mixture of a JSONL file and a
# synthetic task; chunks of 4 samples fill one row each, so the global batch of a step is the same
# for one process and for two
EXAMPLE = os.path.join(ROOT, "data", "example.jsonl")
COMMON = ["--stage", "3", "--steps", "4", "--warmup", "1", "--rows", "2", "--chunk-size", "4",
          "--seq-len", "2048", "--workers", "0", "--no-eval", "--precision", "fp32", "--threads", "1",
          "--save-every", "2", "--stage-data", f"3={EXAMPLE}:1,count:1"]


def torchrun(args, nproc=2, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


def save_start(path, cfg, processor):
    torch.manual_seed(0)
    model = MiMoVL(cfg)
    training.save_stage_folder(path, model.state_dict(), model.cfg, processor, {"stage": "test"})


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tokenizer and a fresh tiny model in a stage folder: the start of stage 3."""
    root = tmp_path_factory.mktemp("scaleout")
    synthetic.train_tokenizer(str(root / "tok"), vocab_size=1024, n_samples=500)
    processor = Processor.from_pretrained(str(root / "tok"))
    save_start(str(root / "start"), MiMoVLConfig.preset("tiny"), processor)
    return str(root / "start")


def test_sharded_checkpoint_resumes_with_one_and_two_processes(start, tmp_path, capsys):
    args = [*COMMON, "--from", start]
    ref = str(tmp_path / "ref")
    tp.main(["--out", ref, *args, "--save-every", "0"])           # one process, uninterrupted
    assert f"3      {os.path.relpath(EXAMPLE)} 45%, count 45%" in capsys.readouterr().out   # the mixture

    stopped = str(tmp_path / "stopped")
    r = torchrun([os.path.join(ROOT, "train_pretrain.py"), "--out", stopped, *args, "--fsdp",
                  "--debug-stop-after", "2"], check=False)
    assert "stopping after step 2" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = f"{stopped}/checkpoints/stage3/step-000002"
    assert os.path.isfile(f"{ckpt}/COMPLETE") and os.path.isfile(f"{ckpt}/dcp/.metadata")
    assert sorted(f for f in os.listdir(f"{ckpt}/dcp") if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not os.path.exists(f"{ckpt}/model.safetensors")      # nothing gathered to one rank
    assert training.checkpoint_problem(ckpt) is None

    # a sharded checkpoint without its marker (a writer killed before the rename) is ignored
    torn = str(tmp_path / "torn" / "step-000002")
    shutil.copytree(ckpt, torn)
    os.remove(f"{torn}/COMPLETE")
    assert training.checkpoint_problem(torn) == "COMPLETE is missing"
    assert training.resume_checkpoint(os.path.dirname(torn), log=lambda m: None) is None

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    shutil.copytree(stopped, one)
    shutil.copytree(stopped, two)
    tp.main(["--out", one, *args, "--resume"])                                 # one process
    torchrun([os.path.join(ROOT, "train_pretrain.py"), "--out", two, *args, "--fsdp", "--resume"])

    expected = losses(ref)
    assert [s for s, _, _ in expected] == [1, 2, 3, 4]
    for out in (one, two):
        got = losses(out)
        assert [s for s, _, _ in got] == [1, 2, 3, 4]
        for (_, l1, g1), (_, l2, g2) in zip(expected, got):
            assert abs(l1 - l2) <= 1e-5 * abs(l1), (out, expected, got)
            assert abs(g1 - g2) <= 1e-4 * abs(g1), (out, expected, got)
        a, b = load_file(f"{ref}/stage3/model.safetensors"), load_file(f"{out}/stage3/model.safetensors")
        assert sorted(a) == sorted(b)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # the streamed export of the two-process run is a transformers folder with the same logits
    from transformers import Qwen2_5_VLForConditionalGeneration
    folder = f"{two}/stage3"
    ours = MiMoVL.from_pretrained(folder).eval()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    processor = Processor.from_pretrained(folder)
    sample = synthetic.make_sample("count", 0, "heldout")
    batch = processor([sample["messages"]], add_generation_prompt=False)
    with torch.no_grad():
        a, b = ours(**batch).logits, hf(**batch).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_the_data_position_of_a_checkpoint_splits_over_another_number_of_processes():
    """Aligned positions continue exactly; others skip ahead to the next common boundary, saying so."""
    at = lambda chunk, row, rank: {"chunk": chunk, "row": row, "rank": rank, "world_size": 2, "skipped": 1,
                                   "too_long": rank, "seed": 0, "chunk_size": 4, "max_tokens": 2048}
    saved = [at(3, 0, 0), at(3, 0, 1)]                  # 2 ranks x 3 chunks: global chunks 0..5 read
    assert training.rank_loader_state(saved, 1, 2) == saved[1]
    one = training.rank_loader_state(saved, 0, 1)
    assert (one["chunk"], one["row"], one["world_size"], one["skipped"], one["too_long"]) == (6, 0, 1, 2, 1)
    three = [training.rank_loader_state(saved, r, 3) for r in range(3)]
    assert [(s["chunk"], s["rank"], s["skipped"]) for s in three] == [(2, 0, 2), (2, 1, 0), (2, 2, 0)]
    assert training.rank_loader_state([{"step": 5}] * 2, 0, 1) == {"step": 5}
    notes = []
    # 6 chunks read do not split over 4 ranks: all start at chunk 8, chunks 6 and 7 are skipped
    four = [training.rank_loader_state(saved, r, 4, notes.append) for r in range(4)]
    assert [(s["chunk"], s["row"], s["rank"]) for s in four] == [(2, 0, 0), (2, 0, 1), (2, 0, 2), (2, 0, 3)]
    assert "starts at data chunk 8" in notes[-1] and "2 data chunk(s) that no rank had read" in notes[-1]
    # mid-chunk: rank 0 began its 4th chunk (global 6), rank 1 is at the start of its 4th (global 7):
    # one process starts at chunk 7, skipping the rest of chunk 6
    mid = training.rank_loader_state([at(3, 1, 0), at(3, 0, 1)], 0, 1, notes.append)
    assert (mid["chunk"], mid["row"], mid["skipped"]) == (7, 0, 2) and "dataset" not in mid
    assert "the rest of 1 partly read chunk(s) are skipped" in notes[-1]
    # RL's prompt stream: rank 0 read global prompts 0, 2, .., 14, rank 1 1, 3, .., 17; prompt 16
    # was never drawn; the easy pools go to the ranks that take over
    rl = [{"position": 8, "easy": ["train/count/1"], "prompts_seen": 32},
          {"position": 9, "easy": ["train/count/4", "train/count/9"], "prompts_seen": 32}]
    one_rl = training.rank_loader_state(rl, 0, 1, notes.append)
    assert one_rl["position"] == 18 and one_rl["easy"] == ["train/count/1", "train/count/4", "train/count/9"]
    assert "1 prompt(s) that no rank had read" in notes[-1]
    with pytest.raises(SystemExit):                     # a position this code cannot split
        training.rank_loader_state([{"offset": 8}, {"offset": 9}], 0, 1)


def peak_rss_rise(start):
    """Bytes by which this process's peak RSS (VmHWM) rose above its RSS before `start()`."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    torch.empty(1, device="meta") + 1       # the baseline includes torch's meta kernels (~70 MB, imported once)
    base = status("VmRSS")
    result = start()
    return status("VmHWM") - base, result


def rss_worker(mode, model_dir, out):
    """The memory test's measurement in a fresh process: `sharded` (under torchrun) builds the
    model on the meta device, shards it and reads each rank's rows; `whole` loads it whole."""
    if mode == "whole":
        @torch.no_grad()
        def load():          # every parameter read once, as a training step does
            model = MiMoVL.from_pretrained(model_dir, dtype=torch.float32, progress=False)
            sum(float(p.sum()) for p in model.parameters())
            return model
        peak, model = peak_rss_rise(load)
        record = {"peak": peak, "model_bytes": sum(p.numel() * 4 for p in model.parameters()),
                  "probe": {n: p.sum().item() for n, p in list(model.named_parameters())[:3]}}
    else:
        compute = training.compute_init("cpu", "fp32", quiet=True)
        peak, wrapped = peak_rss_rise(lambda: training.wrap_model(training.meta_model(model_dir), compute,
                                                                  fsdp=True, weights=model_dir))
        record = {"peak": peak, "own_shard_bytes": sum(p.to_local().numel() * 4 for p in wrapped.parameters()),
                  "probe": {n: p.full_tensor().sum().item() for n, p in list(wrapped.named_parameters())[:3]}}
        out = f"{out}.rank{compute.rank}"
    with open(out, "w") as f:
        json.dump(record, f)


def test_sharded_start_holds_about_one_shard_per_rank(tmp_path):
    """A model of 308 MiB fp32 (the tiny preset widened 3x: an 8-layer, 768-wide LM; larger than
    a rank's shard by the number of ranks): each rank's peak memory while building, sharding and
    filling it stays near its own shard, where loading it whole takes the whole model."""
    cfg = MiMoVLConfig.preset("tiny")
    t, v = cfg.text, cfg.vision
    t.num_attention_heads, t.num_key_value_heads, t.hidden_size = 12, 6, 768
    t.intermediate_size, t.num_hidden_layers, t.vocab_size = 2064, 8, 8192
    v.num_heads, v.hidden_size, v.intermediate_size, v.depth = 6, 384, 768, 8
    v.fullatt_block_indexes, v.out_hidden_size = [1, 3, 5, 7], 768
    synthetic.train_tokenizer(str(tmp_path / "tok"), vocab_size=1024, n_samples=200)
    processor = Processor.from_pretrained(str(tmp_path / "tok"))
    save_start(str(tmp_path / "big"), cfg.validate(), processor)
    me, big, out = os.path.abspath(__file__), str(tmp_path / "big"), str(tmp_path / "rss")
    torchrun([me, "--rss-worker", "sharded", big, out])
    subprocess.run([sys.executable, me, "--rss-worker", "whole", big, out + ".whole"], check=True, timeout=300)
    whole = json.load(open(out + ".whole"))
    ranks = [json.load(open(f"{out}.rank{r}")) for r in range(2)]
    print(f"\nmodel {whole['model_bytes'] / 2 ** 20:.0f} MiB fp32; peak RSS rise, whole load: "
          f"{whole['peak'] / 2 ** 20:.0f} MiB; sharded start, per rank: " +
          ", ".join(f"{r['peak'] / 2 ** 20:.0f} MiB (own shard {r['own_shard_bytes'] / 2 ** 20:.0f})" for r in ranks))
    assert whole["peak"] >= 0.9 * whole["model_bytes"]
    for r in ranks:
        assert r["probe"] == pytest.approx(whole["probe"], rel=1e-6)      # the right rows, gathered back
        assert r["own_shard_bytes"] <= 0.55 * whole["model_bytes"]
        # its own shard plus a little: one tensor's rows are read at a time
        assert r["peak"] <= r["own_shard_bytes"] + 0.1 * whole["model_bytes"], (r, whole)


if __name__ == "__main__" and sys.argv[1:2] == ["--rss-worker"]:
    rss_worker(*sys.argv[2:5])

"""MORL with an FSDP2-sharded policy (train_rl.py --fsdp under torchrun, gloo on CPU): two
processes give the losses, gradient norms, rewards and final weights of one process at the same
global batch, and a run killed after a sharded checkpoint resumes to the uninterrupted run.

Why they can match: a prompt's responses are sampled with a seed of its slot in the global batch
(rollouts.sample_groups), one prompt per generate call (--gen-rows = G), from a full copy of the
policy's weights gathered for the rollout (train_rl.rollout_weights); the loss normaliser is
computed over all ranks (train_rl.batch_weights) and FSDP2 averages the gradients. The policy is
test_rl.py's tiny model with a word-level tokenizer, so a random policy sometimes answers right.
The sharded checkpoint resumes with two processes and with one.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import reward_model
import train_rl as rl
import training
from mimovl import MiMoVL
from test_rl import make_processor, tiny_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args_for(sft, out, *extra):
    return ["train_rl.py", "--sft", sft, "--out", str(out), "--tasks", "count", "--steps", "3",
            "--prompts-per-step", "4", "--group-size", "8", "--gen-rows", "8", "--max-new-tokens", "4",
            "--eval-n", "2", "--eval-samples", "0", "--precision", "fp32", "--device", "cpu",
            "--reward-workers", "0", "--lr", "1e-4", "--no-dynamic-sampling", "--easy-prob", "0",
            "--threads", "1", "--save-every", "2", *extra]


def run(argv, nproc=1, check=True):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    r = subprocess.run([sys.executable, *launcher, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["reward"], r["kept_groups"], r["loss"], r["grad_norm"],
                 r.get("last_loss", 0.0), r.get("last_grad_norm", 0.0)) for r in map(json.loads, f)]


def final_weights(out):
    return MiMoVL.from_pretrained(os.path.join(out, "final"), progress=False).state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_fsdp")
    processor = make_processor()
    model = tiny_policy(processor)
    sft = str(root / "sft")
    training.save_stage_folder(sft, model.state_dict(), model.cfg, processor, {"stage": "test"})
    run(args_for(sft, root / "one"))
    two = run(args_for(sft, root / "two", "--fsdp"), nproc=2)
    return sft, root, two


def assert_same_run(a, b):
    ma, mb = metrics(a), metrics(b)
    assert [m[:3] for m in ma] == [m[:3] for m in mb]          # the same samples, rewards, groups
    assert torch.allclose(torch.tensor([m[3:] for m in ma], dtype=torch.float64),
                          torch.tensor([m[3:] for m in mb], dtype=torch.float64), rtol=1e-5, atol=1e-7)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6), name


def test_two_fsdp_processes_match_one_process_at_the_same_global_batch(runs):
    sft, root, two = runs
    assert "2 process(es)" in two.stdout
    steps = metrics(root / "one")
    assert [s[0] for s in steps] == [1, 2, 3]
    assert sum(s[1] for s in steps) > 0 and any(s[3] != 0 for s in steps)   # something was learnt from
    assert_same_run(root / "one", root / "two")
    # the checkpoint of the FSDP2 run is sharded (each rank wrote its part), not a gathered model
    ckpt = root / "two" / "checkpoints" / "step-000002"
    assert os.path.isdir(ckpt / "dcp") and os.path.isfile(ckpt / "COMPLETE")
    assert not os.path.exists(ckpt / "model.safetensors")


def test_vanilla_grpo_with_kl_under_fsdp_matches_one_process(runs):
    """--algo grpo: pi_old and the KL reference (itself FSDP2-sharded) come from forwards without
    backward, after which FSDP2 keeps the root unit gathered; the clipped gradient norm must still
    cover every parameter (it once missed lm_head's)."""
    sft, root, _ = runs
    extra = ["--algo", "grpo", "--updates-per-batch", "2", "--kl-beta", "0.01", "--steps", "2",
             "--save-every", "0"]
    run(args_for(sft, root / "grpo-one", *extra))
    run(args_for(sft, root / "grpo-two", "--fsdp", *extra), nproc=2)
    assert_same_run(root / "grpo-one", root / "grpo-two")
    with open(root / "grpo-two" / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    assert last["updates"] == 2 and last["last_kl"] > 0 and last["last_grad_norm"] > 0


def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(runs):
    sft, root, _ = runs
    stopped = run(args_for(sft, root / "resumed", "--fsdp", "--debug-stop-after", "2"), nproc=2, check=False)
    assert stopped.returncode != 0 and not os.path.exists(root / "resumed" / "final")
    shutil.copytree(root / "resumed", root / "resumed-one")
    run(args_for(sft, root / "resumed", "--fsdp", "--resume"), nproc=2)
    assert_same_run(root / "two", root / "resumed")
    # the sharded checkpoint also resumes in one process: both ranks had read 4 prompts (8 in all),
    # so it continues the uninterrupted run exactly
    one = run(args_for(sft, root / "resumed-one", "--resume"))
    assert "starts at prompt 8 of the global order; nothing is skipped" in one.stdout
    assert_same_run(root / "two", root / "resumed-one")


def test_paper_recipe_sets_the_report_scale_and_explicit_flags_win():
    paper = rl.parse_args(["--recipe", "paper"])
    assert (paper.prompts_per_step, paper.group_size, paper.max_new_tokens, paper.lr, paper.tasks,
            paper.fsdp) == (512, 16, 32768, 1e-6, "all", True)
    mine = rl.parse_args(["--recipe", "paper", "--lr", "2e-6", "--group-size", "8"])
    assert (mine.lr, mine.group_size, mine.prompts_per_step) == (2e-6, 8, 512)
    tiny = rl.parse_args([])
    assert (tiny.prompts_per_step, tiny.group_size, tiny.lr, tiny.tasks, tiny.fsdp) == (16, 8, 3e-5, "auto", False)


def test_the_readme_7b_morl_command_runs_at_tiny_scale_on_two_processes(runs):
    """README: torchrun ... train_rl.py --recipe paper --sft DIR --rm RM --rm-device DEVICE,
    shrunk to the tiny model, with the reward model in a process of its own per rank (on the
    CPU here)."""
    sft, root, _ = runs
    processor = make_processor()
    torch.manual_seed(3)
    rm = reward_model.RewardModel(tiny_policy(processor))
    rm_dir = str(root / "reward_model")
    reward_model.save(rm_dir, rm, processor, {"stage": "reward_model"},
                      training.compute_init("cpu", "fp32", quiet=True))
    out = root / "paper"
    r = run(["train_rl.py", "--recipe", "paper", "--sft", sft, "--rm", rm_dir, "--rm-device", "cpu",
             "--out", str(out), "--steps", "1",
             "--prompts-per-step", "4", "--group-size", "2", "--gen-rows", "2", "--max-new-tokens", "3",
             "--eval-n", "1", "--eval-samples", "0", "--precision", "fp32", "--device", "cpu",
             "--reward-workers", "0", "--threads", "1"], nproc=2)
    assert "FSDP2-sharded over 2 processes" in r.stdout and "lr 1e-06" in r.stdout
    assert "reward model: its own process on cpu" in r.stdout
    trained = r.stdout.split("tasks: ")[1].split(";")[0].split(", ")
    assert "caption" in trained and len(trained) == 9             # all tasks, the reward model's too
    assert os.path.isfile(out / "final" / "model.safetensors")


def test_a_bad_reward_model_device_is_one_line_before_any_work(runs, tmp_path, capsys):
    sft, root, _ = runs
    with pytest.raises(SystemExit) as stop:
        rl.main(["--sft", sft, "--out", str(tmp_path / "x"), "--rm-device", "gpu7", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "--rm-device 'gpu7'" in err
    assert not os.path.exists(tmp_path / "x")

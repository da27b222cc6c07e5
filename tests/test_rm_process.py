"""reward_model.RewardModelServer: the Bradley-Terry reward model in a process of its own (MiMo-VL
report §3.3, reward models served as standalone services). The reference is the same folder
loaded in this process: the server's logits on a batch with images equal the in-process
model's, and the router's "preference" reward through the server equals the in-process one. A
folder that cannot be loaded fails at start with one line naming it; a killed child makes the
next request raise at once; close() leaves no process behind.

The model is tiny_config's random 2 + 2-layer MiMoVL with a random head (nothing to train:
equality is what is tested). Each server is a spawned process that imports torch, so the file
starts three: one shared by the scoring tests, one to kill, one that fails to load.
"""

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import reward_model
import rewards as R
import train_rl
import training
from mimovl import MiMoVL
from test_rl import make_processor, tiny_config

CPU = training.compute_init("cpu", "fp32", quiet=True)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, processor):
    """A reward model folder as reward_model.save writes it, with a non-zero random head."""
    torch.manual_seed(7)
    rm = reward_model.RewardModel(MiMoVL(tiny_config(processor.tokenizer.get_vocab_size())))
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    path = str(tmp_path_factory.mktemp("rm") / "reward_model")
    reward_model.save(path, rm, processor, {"stage": "reward_model", "after": {"accuracy": 0.75}}, CPU)
    return path


@pytest.fixture(scope="module")
def server(rm_dir):
    with reward_model.RewardModelServer(rm_dir, device="cpu", dtype="fp32", threads=1) as s:
        yield s


def conversations():
    """Three conversations: two with a (different) image, one text-only."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)) for _ in range(2)]

    def image_turn(im):
        return [{"role": "user", "content": [{"type": "image", "image": im, "max_pixels": 56 * 84},
                                             {"type": "text", "text": "How many red shapes ?"}]}]
    return [image_turn(images[0]) + [{"role": "assistant", "content": "good 3"}],
            [{"role": "user", "content": "How many blue shapes ?"},
             {"role": "assistant", "content": "bad 7"}],
            image_turn(images[1]) + [{"role": "assistant", "content": "answer 12"}]]


def test_server_logits_equal_the_in_process_model(server, rm_dir, processor):
    assert server.record["after"]["accuracy"] == 0.75                    # the folder's record
    batch = processor(conversations(), add_generation_prompt=False)
    assert batch["pixel_values"].shape[0] > 0 and batch["image_grid_thw"].shape[0] == 2
    local, _ = reward_model.load(rm_dir)
    with torch.no_grad():
        expected = local(**batch).tolist()
    got = server.logits(batch)
    assert len(got) == 3 and len(set(got)) == 3                          # three different scores
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # one at a time gives the same logits as the batch (left padding changes nothing)
    one = [server.logits(processor([c], add_generation_prompt=False))[0] for c in conversations()]
    torch.testing.assert_close(torch.tensor(one), torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_preference_reward_through_the_server_equals_in_process(server, rm_dir, processor):
    local, _ = reward_model.load(rm_dir)
    messages = [{"role": "user", "content": "How many green shapes ?"}]
    results = {}
    for name, rm in (("local", local), ("server", server)):
        R.register_reward_model(reward_model.scorer(rm, processor, CPU))
        try:
            results[name] = [R.compute_reward("preference", answer, None, messages=messages)
                             for answer in ("good 2", "bad 9", "answer 4")]
        finally:
            R.register_reward_model(None)
    for (a, ca), (b, cb) in zip(results["local"], results["server"]):
        assert 0.0 < a < 1.0 and "error" not in ca
        assert a == pytest.approx(b, abs=1e-6) and ca["rm_logit"] == pytest.approx(cb["rm_logit"], abs=1e-5)
        assert a == pytest.approx(1 / (1 + np.exp(-ca["rm_logit"])), abs=1e-9)   # sigmoid of the logit


def test_a_bad_batch_is_an_error_and_the_server_keeps_serving(server, processor):
    batch = processor(conversations()[:1], add_generation_prompt=False)
    with pytest.raises(RuntimeError, match=r"ValueError: pixel_values has \d+ patch rows but grid_thw"):
        server.logits({**batch, "image_grid_thw": batch["image_grid_thw"] * 2})
    assert len(server.logits(batch)) == 1


def test_a_folder_that_is_not_a_reward_model_fails_with_one_line(tmp_path, rm_dir, capsys):
    # no extra.safetensors: refused before any process starts
    with pytest.raises(SystemExit) as stop:
        reward_model.RewardModelServer(str(tmp_path / "missing"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "missing") in err and "--train-rm" in err
    # truncated weights: the child cannot load them and says why, in one line naming the folder
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for name in os.listdir(rm_dir):
        data = open(os.path.join(rm_dir, name), "rb").read()
        (bad / name).write_bytes(data[:len(data) // 2] if name == "model.safetensors" else data)
    with pytest.raises(SystemExit) as stop:
        reward_model.RewardModelServer(str(bad), threads=1)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"reward model process for {bad} on cpu failed while loading" in err
    assert "model.safetensors" in err and "corrupt" in err


def test_a_killed_server_raises_on_the_next_request_and_close_leaves_nothing(rm_dir, processor):
    batch = processor(conversations()[1:2], add_generation_prompt=False)
    # timeout_s: were the death not noticed, the request would end in a timeout, not "died"
    server = reward_model.RewardModelServer(rm_dir, threads=1, timeout_s=60)
    try:
        assert len(server.logits(batch)) == 1
        os.kill(server.process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"died while scoring \(killed by SIGKILL"):
            server.logits(batch)
    finally:
        server.close()
    assert not server.process.is_alive() and server.process.exitcode == -signal.SIGKILL
    with pytest.raises(RuntimeError, match="closed"):
        server.logits(batch)


def test_morl_with_the_reward_model_in_its_own_process_equals_in_process(rm_dir, processor, tmp_path):
    """train_rl.py --rm-device cpu: captions scored by the server, the same run as in-process."""
    sft = str(tmp_path / "sft")
    policy = MiMoVL(tiny_config(processor.tokenizer.get_vocab_size()))
    training.save_stage_folder(sft, policy.state_dict(), policy.cfg, processor, {"stage": "test"})
    common = ["--sft", sft, "--rm", rm_dir, "--tasks", "caption", "--steps", "2", "--prompts-per-step", "2",
              "--group-size", "2", "--max-new-tokens", "3", "--eval-n", "2", "--eval-samples", "0",
              "--precision", "fp32", "--device", "cpu", "--reward-workers", "0", "--threads", "1",
              "--no-dynamic-sampling"]
    runs = {}
    for name, extra in (("inline", []), ("server", ["--rm-device", "cpu"])):
        done = train_rl.main([*common, "--out", str(tmp_path / name), *extra])
        with open(tmp_path / name / "metrics.jsonl") as f:
            runs[name] = [x for r in map(json.loads, f) for x in (r["reward"], r["loss"])]
        runs[name].append(done["rl"]["caption"]["reward"])
    assert runs["inline"][0] > 0                             # the reward model did score them
    assert runs["server"] == pytest.approx(runs["inline"], abs=1e-6)


def test_close_stops_the_child_cleanly(server):
    # runs last in this file: the shared server ends here (the fixture's close then does nothing)
    process = server.process
    assert process.is_alive()
    server.close()
    assert not process.is_alive() and process.exitcode == 0     # it stopped on request, not killed
    server.close()                                              # idempotent

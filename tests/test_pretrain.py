"""train_pretrain.py: every stage runs and freezes what it should, exact resume, DDP/FSDP2 under
torchrun equal one process, the NaN guard, stage folders that transformers 4.57 loads, --init, and
the evaluation scorers (hand-computed cases)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import packing
import synthetic
import evaluate as ev
import train_pretrain as tp
import training
from mimovl import MiMoVL, MiMoVLConfig, tiny_config
from processor import Processor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short runs: small rows, 2 steps, no evaluation, fp32 (bit-exact comparisons), no worker processes.
FAST = ["--steps", "2", "--warmup", "1", "--seq-len", "512", "--rows", "0-vit:4", "--chunk-size", "8",
        "--workers", "0", "--no-eval", "--precision", "fp32", "--save-every", "0"]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def losses(out, stage):
    """(loss, grad norm) of every logged step of a stage, in log order."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["loss"], r["grad_norm"]) for r in map(json.loads, f) if r["stage"] == stage]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Stage 0-lm .. 4, two steps each, every stage from the previous one's folder, under bf16
    autocast (the default precision on CPUs with native bf16; fp32 master weights)."""
    out = str(tmp_path_factory.mktemp("pretrain"))
    tp.main(["--out", out, *FAST, "--precision", "bf16"])
    return out


def test_every_part_of_the_model_belongs_to_one_stage_part():
    model = MiMoVL(MiMoVLConfig.preset("tiny"))
    parts = {training.part_of(n) for n, _ in model.named_parameters()}
    assert parts == set(training.PARTS)
    assert training.set_trainable(model, ("projector",)) == sum(p.numel() for p in model.visual.merger.parameters())


def test_every_stage_runs_and_frozen_parameters_stay_bit_identical(chain):
    tokenizer = Processor.from_pretrained(f"{chain}/tokenizer")
    fresh = tp.fresh_model(tp.build_parser().parse_args([]), tokenizer).state_dict()
    before = {"0-lm": fresh, "0-vit": weights(f"{chain}/stage0-lm"), "1": weights(f"{chain}/stage0-vit"),
              "2": weights(f"{chain}/stage1"), "3": weights(f"{chain}/stage2"), "4": weights(f"{chain}/stage3")}
    for key, stage in tp.STAGES.items():
        after = weights(f"{chain}/stage{key}")
        assert set(after) == set(before[key])
        for name, w in after.items():
            part = training.part_of(name)
            if part in stage.trainable:
                continue
            assert torch.equal(w, before[key][name]), f"stage {key} changed frozen {name}"
        changed = {training.part_of(n) for n, w in after.items() if not torch.equal(w, before[key][n])}
        assert changed == set(stage.trainable), f"stage {key} trained {changed}, expected {stage.trainable}"
        assert len(losses(chain, key)) == 2 and all(math.isfinite(l) for l, _ in losses(chain, key))
    # stage 1 starts from a fresh projector (MiMo-VL report §2.1), not from stage 0-vit's classifier merger
    assert os.path.isfile(f"{chain}/stage0-vit/extra.safetensors")      # the temporary cell head


def test_resume_after_a_crash_gives_the_same_losses(chain, tmp_path, capsys):
    common = ["--stage", "3", "--from", f"{chain}/stage2", *FAST, "--steps", "4", "--save-every", "1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    tp.main(["--out", full, *common])
    with pytest.raises(SystemExit) as e:
        tp.main(["--out", cut, *common, "--debug-stop-after", "3"])   # "crashes" after step 3
    assert e.value.code == 3
    ckpts = f"{cut}/checkpoints/stage3"
    assert [os.path.basename(p) for p in training.list_checkpoints(ckpts)] == ["step-000002", "step-000003"]
    # the newest checkpoint is damaged, and a killed write left its temporary folder behind
    with open(f"{ckpts}/step-000003/model.safetensors", "r+b") as f:
        f.truncate(1000)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(f"{ckpts}/step-000004.tmp-{dead.pid}")
    capsys.readouterr()
    tp.main(["--out", cut, *common, "--resume"])                       # resumes from step 2
    said = capsys.readouterr().out
    assert f"skipping checkpoint {ckpts}/step-000003: model.safetensors: header of" in said
    assert f"step-000004.tmp-{dead.pid}" in said and not os.path.exists(f"{ckpts}/step-000004.tmp-{dead.pid}")
    assert f"resuming from {ckpts}/step-000002 (step 2)" in said
    assert losses(cut, "3") == losses(full, "3")                      # bit-identical, no step twice
    a, b = weights(f"{full}/stage3"), weights(f"{cut}/stage3")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_rerun_without_resume_or_overwrite_refuses_and_deletes_nothing(chain, capsys):
    before = {d: os.path.getmtime(f"{chain}/{d}") for d in os.listdir(chain)}
    with pytest.raises(SystemExit) as e:
        tp.main(["--out", chain, *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and chain in err and "--resume" in err and "--overwrite" in err
    assert {d: os.path.getmtime(f"{chain}/{d}") for d in os.listdir(chain)} == before


def test_cpu_threads_are_chosen_again_for_every_stage(tmp_path, monkeypatch, capsys):
    busy = iter([2.0, 3.0])                 # the machine gets busier between the two stages
    monkeypatch.setattr(training, "busy_cores", lambda window_s=0.5: next(busy))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    before = torch.get_num_threads()
    try:
        tp.main(["--out", str(tmp_path), "--stage", "0", *FAST, "--steps", "1", "--seq-len", "256"])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "stage 0-lm: torch CPU threads: 2 (4 cores, 2.0 busy" in out
    assert "stage 0-vit: torch CPU threads: 1 (4 cores, 3.0 busy" in out


def _torchrun(out, extra, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train_pretrain.py"), "--out", out, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_ddp_and_fsdp2_on_two_processes_match_one_process(chain, tmp_path):
    # chunks of 4 samples fit one row each, so rank r's row of step s is the row that one process
    # reads as micro-batch r of step s: the same global batch either way. DDP is given --rows 1
    # and --scale 16 (the README's 8-GPU command): 1 row rounds up to one per process
    common = ["--stage", "3", "--from", f"{chain}/stage2", *FAST, "--steps", "3", "--rows", "2",
              "--chunk-size", "4", "--seq-len", "2048", "--threads", "1"]
    one = str(tmp_path / "one")
    tp.main(["--out", one, *common])
    ref = losses(one, "3")
    for mode in ([], ["--fsdp"]):
        out = str(tmp_path / ("fsdp" if mode else "ddp"))
        said = _torchrun(out, common + (mode or ["--rows", "1", "--scale", "16"]), 2)
        assert mode or "stage 3: --rows 1 rounded up to 2 per step (global batch)" in said
        got = losses(out, "3")
        assert len(got) == len(ref) == 3
        for (l1, g1), (l2, g2) in zip(ref, got):
            assert abs(l1 - l2) <= 1e-5 * abs(l1), (mode, ref, got)
            assert abs(g1 - g2) <= 1e-4 * abs(g1), (mode, ref, got)
        a, b = weights(f"{one}/stage3"), weights(f"{out}/stage3")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(chain, tmp_path):
    out = str(tmp_path / "nan")
    args = ["--out", out, "--stage", "3", "--from", f"{chain}/stage2", *FAST, "--steps", "5",
            "--save-every", "2", "--debug-nan-at-step", "3"]
    with pytest.raises(SystemExit) as e:
        tp.main(args)
    msg = str(e.value.code)
    assert "loss is nan at step 4" in msg and "step-000002" in msg and "--resume" in msg
    assert not os.path.exists(f"{out}/stage3")                        # no stage output from bad weights
    ckpt = f"{out}/checkpoints/stage3/step-000002"
    assert json.load(open(f"{ckpt}/trainer_state.json"))["step"] == 2
    good = MiMoVL.from_pretrained(ckpt)                               # intact and loadable
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert [os.path.basename(p) for p in training.list_checkpoints(f"{out}/checkpoints/stage3")] == ["step-000002"]


def test_stage_folder_loads_in_transformers_with_matching_logits(chain):
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration
    folder = f"{chain}/stage3"
    ours = MiMoVL.from_pretrained(folder).eval()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    processor = Processor.from_pretrained(folder)
    sample = synthetic.make_sample("count", 0, "heldout", difficulty=synthetic.LARGE)   # 224 px: two windows
    batch = processor([sample["messages"]], add_generation_prompt=False)
    with torch.no_grad():
        a = ours(**batch).logits
        b = hf(**batch).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=f"{folder}/tokenizer.json")
    text = processor.apply_chat_template(sample["messages"][:1])
    assert hf_tok(text)["input_ids"] == processor.encode(text)


def test_init_from_a_qwen25vl_checkpoint_reinitialises_only_the_projector(chain, tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tiny = MiMoVLConfig.preset("tiny").to_hf_dict()
    tiny.pop("text_config")          # the transformers-4 layout: text fields and token ids at top level
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**tiny))
    init = str(tmp_path / "qwen")
    hf.save_pretrained(init)
    Processor.from_pretrained(f"{chain}/stage3").save_pretrained(init)
    out = str(tmp_path / "out")
    tp.main(["--out", out, "--init", init, "--stage", "1", *FAST, "--steps", "1", "--lr", "0"])
    after = weights(f"{out}/stage1")
    start = MiMoVL.from_pretrained(init).state_dict()
    for name, w in after.items():
        if training.part_of(name) == "projector" and name.endswith("weight") and w.ndim == 2:
            assert not torch.equal(w, start[name]), name                # re-initialised
        elif training.part_of(name) != "projector":
            assert torch.equal(w, start[name]), name                    # ViT and LM as loaded


def test_lr_schedule_warmup_then_cosine():
    s = dict(lr=1.0, min_lr=0.1, warmup=4, steps=14)
    assert [training.lr_at(i, **s) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert training.lr_at(9, **s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert training.lr_at(14, **s) == pytest.approx(0.1) and training.lr_at(100, **s) == pytest.approx(0.1)


def test_scorers_on_hand_made_cases():
    assert ev.score_numeric("<think>\n3 + 4 = 7\n</think>\n\\boxed{7}", "7") == {"acc": 1.0}
    assert ev.score_numeric("\\boxed{12}", "7") == {"acc": 0.0}
    assert ev.score_numeric("", "7") == {"acc": 0.0}
    assert ev.score_exact("  AB7 ", "AB7") == {"acc": 1.0}
    assert ev.score_exact("AB", "AB7") == {"acc": 0.0}
    assert ev.score_choice("2.", "2") == {"acc": 1.0}
    # boxes: [0,0,10,10] vs [5,0,15,10]: intersection 50, union 150
    r = ev.score_box('[{"bbox_2d": [0, 0, 10, 10], "label": "red circle"}]', [5, 0, 15, 10])
    assert r["iou"] == pytest.approx(1 / 3) and r["acc@0.5"] == 0.0
    assert ev.score_box('[{"bbox_2d": [4, 4, 24, 24]}]', [4, 4, 24, 24]) == {"acc@0.5": 1.0, "iou": 1.0}
    assert ev.score_box("no box here", [4, 4, 24, 24]) == {"acc@0.5": 0.0, "iou": 0.0}
    assert ev.score_point('[{"point_2d": [14, 14]}]', [4, 4, 24, 24]) == {"acc": 1.0}
    # spans: [00:01,00:03] vs [2, 4] seconds: intersection 1, union 3
    r = ev.score_span("[00:01,00:03]", [2, 4])
    assert r["tiou"] == pytest.approx(1 / 3) and r["acc@0.5"] == 0.0
    assert ev.score_span("[00:02,00:04]", "[00:02,00:04]")["tiou"] == 1.0
    assert ev.scorer_for({"answer": [1, 2, 3, 4]}) == "box"
    assert ev.scorer_for({"answer": "[00:01,00:02]"}) == "span"
    assert ev.scorer_for({"answer": "42"}) == "numeric"
    assert ev.scorer_for({"answer": "B"}) == "choice"
    assert ev.scorer_for({"answer": "hello world"}) == "exact"


def test_majority_baseline_scores_the_most_frequent_answer():
    samples = [{"task": "count", "answer": a} for a in ("1", "1", "2", "3")]
    assert ev.majority_baseline(samples)["count"]["acc"] == 0.5
    boxes = [{"task": "ground_box", "answer": b} for b in ([0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30])]
    m = ev.majority_baseline(boxes)["ground_box"]
    assert m["acc@0.5"] == pytest.approx(2 / 3) and m["iou"] == pytest.approx(2 / 3)


def test_scale_widens_the_tiny_model():
    assert tiny_config(1) == MiMoVLConfig.preset("tiny")
    cfg = tiny_config(4)                         # w = 2: twice the heads of every tower
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.vision.hidden_size) == (512, 6, 256)
    assert cfg.text.head_dim == 64 and cfg.vision.head_dim == 64
    model = MiMoVL(cfg)
    x = torch.randint(10, 100, (1, 12))
    assert model(x, labels=x).loss.isfinite()


class EchoModel:
    """Stands in for MiMoVL in evaluate(): answers each prompt with a fixed response, found by
    the question it contains, as token ids followed by the stop token (then padding)."""

    device = torch.device("cpu")

    def __init__(self, processor, responses):
        self.processor, self.responses = processor, responses

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, stop_token_ids=None, **kw):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.processor.decode(ids[mask.bool()])
            response = next(r for q, r in self.responses.items() if q in prompt)
            rows.append(self.processor.encode(response)[:max_new_tokens - 1] + [stop_token_ids[0]])
        width = max(map(len, rows))
        return torch.tensor([r + [stop_token_ids[0]] * (width - len(r)) for r in rows])


def test_evaluate_scores_a_jsonl_file_end_to_end(chain):
    """The evaluator on data/example.jsonl (images from paths, a video from a frame folder):
    reference answers score 1 on every metric, wrong ones 0, and the blank-image pass runs."""
    processor = Processor.from_pretrained(f"{chain}/stage3")
    samples = [s for s in packing.JsonlDataset(os.path.join(ROOT, "data", "example.jsonl")) if s.get("answer")]
    question = {}
    for s in samples:
        user = [m for m in s["messages"] if m["role"] == "user"][-1]["content"]
        q = user if isinstance(user, str) else [i["text"] for i in user if i.get("type") == "text"][-1]
        question[q] = s["messages"][-1]["content"]
    right = ev.evaluate(EchoModel(processor, question), processor, samples, batch_size=4)
    assert len(right["records"]) == len(samples) >= 6
    for task, m in right["by_task"].items():
        for metric in ev.PRIMARY_METRICS[m["scorer"]]:
            assert m[metric] == 1.0, (task, metric, right["records"])
    wrong = ev.evaluate(EchoModel(processor, {q: "no idea" for q in question}), processor, samples,
                        batch_size=4, blank=True)
    for task, m in wrong["by_task"].items():
        assert all(m[metric] == 0.0 for metric in ev.PRIMARY_METRICS[m["scorer"]]), (task, m)

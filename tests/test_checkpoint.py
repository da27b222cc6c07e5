"""Checkpoint round trips in both key namings, sharded / mixed-dtype loading, and the errors a
user gets for broken checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mimovl import MiMoVL, MiMoVLConfig
from reference import hf_model, pixels, sequence


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, imgs, _ = sequence([3, ("image", (1, 10, 12)), 6], g)
    pv, ig = pixels(imgs, g)
    return torch.tensor([ids]), dict(pixel_values=pv, image_grid_thw=ig)


def logits_of(model, seed=0):
    x, kw = inputs(seed)
    with torch.no_grad():
        if hasattr(model, "visual") and isinstance(model, MiMoVL):
            return model(x, **kw).logits
        return model(input_ids=x, **kw).logits


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    hf = hf_model(seed=1)
    path = tmp_path_factory.mktemp("hf457")
    hf.save_pretrained(path)
    return hf, path


def to_tf5_layout(src, dst):
    """Rewrite a legacy checkpoint the way transformers 5 saves it (its conversion_mapping.py): keys
    model.language_model.* / model.visual.*, config with only a nested text_config."""
    os.makedirs(dst, exist_ok=True)
    sd = load_file(os.path.join(src, "model.safetensors"))
    renamed = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        renamed[k] = v
    save_file(renamed, os.path.join(dst, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    text = cfg["text_config"]
    rope = text.pop("rope_scaling")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                               "mrope_section": rope["mrope_section"]}
    new = {k: cfg[k] for k in ("architectures", "model_type", "image_token_id", "video_token_id",
                               "vision_start_token_id", "vision_end_token_id", "vision_config",
                               "tie_word_embeddings") if k in cfg}
    new["text_config"] = text
    json.dump(new, open(os.path.join(dst, "config.json"), "w"))


def test_load_tf4_naming(hf_saved):
    hf, path = hf_saved
    ours = MiMoVL.from_pretrained(path)
    assert torch.equal(logits_of(ours), logits_of(hf)) or (logits_of(ours) - logits_of(hf)).abs().max() <= 1e-5


def test_load_tf5_naming(hf_saved, tmp_path):
    hf, path = hf_saved
    to_tf5_layout(path, tmp_path)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in load_file(tmp_path / "model.safetensors")
    a = MiMoVL.from_pretrained(path)
    b = MiMoVL.from_pretrained(tmp_path)
    assert torch.equal(logits_of(a), logits_of(b))


def test_ours_saved_loads_in_transformers(hf_saved, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf, path = hf_saved
    ours = MiMoVL.from_pretrained(path)
    ours.save_pretrained(tmp_path)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    assert torch.equal(logits_of(reloaded), logits_of(hf))
    assert torch.equal(logits_of(MiMoVL.from_pretrained(tmp_path)), logits_of(ours))


def test_tied_head_round_trip(tmp_path):
    hf = hf_model(seed=2, tie=True)
    hf.save_pretrained(tmp_path / "hf")
    ours = MiMoVL.from_pretrained(tmp_path / "hf")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert (logits_of(ours) - logits_of(hf)).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")
    assert torch.equal(logits_of(MiMoVL.from_pretrained(tmp_path / "ours")), logits_of(ours))


def test_sharded_mixed_dtypes(hf_saved, tmp_path):
    """bf16 text tensors, fp32 vision tensors, three shards with an index; cast on load."""
    hf, path = hf_saved
    sd = load_file(os.path.join(path, "model.safetensors"))
    keys = sorted(sd)
    groups = [keys[0::3], keys[1::3], keys[2::3]]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: sd[k] if k.startswith("visual.") else sd[k].to(torch.bfloat16) for k in group},
                  tmp_path / name)
        weight_map.update({k: name for k in group})
    json.dump({"weight_map": weight_map}, open(tmp_path / "model.safetensors.index.json", "w"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    for dtype in (torch.float32, torch.bfloat16):
        m = MiMoVL.from_pretrained(tmp_path, dtype=dtype)
        assert {p.dtype for p in m.parameters()} == {dtype}
    m = MiMoVL.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(m.visual.blocks[0].attn.qkv.weight, sd["visual.blocks.0.attn.qkv.weight"])
    assert torch.equal(m.model.layers[0].mlp.up_proj.weight,
                       sd["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16).float())


def test_save_shards_with_index(hf_saved, tmp_path):
    hf, path = hf_saved
    ours = MiMoVL.from_pretrained(path)
    ours.save_pretrained(tmp_path, max_shard_bytes=60_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert torch.equal(logits_of(MiMoVL.from_pretrained(tmp_path)), logits_of(ours))


# --- broken checkpoints -----------------------------------------------------------------------

def copy_ckpt(path, dst, edit=None):
    sd = load_file(os.path.join(path, "model.safetensors"))
    if edit:
        sd = edit(sd)
    os.makedirs(dst, exist_ok=True)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    json.dump(json.load(open(os.path.join(path, "config.json"))), open(os.path.join(dst, "config.json"), "w"))


def test_truncated_shard(hf_saved, tmp_path):
    _, path = hf_saved
    copy_ckpt(path, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        MiMoVL.from_pretrained(tmp_path)


def test_missing_unexpected_and_misshaped_keys_reported_together(hf_saved, tmp_path):
    _, path = hf_saved

    def edit(sd):
        sd.pop("model.layers.1.mlp.down_proj.weight")
        sd["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(7)
        sd["model.extra_head.weight"] = torch.zeros(2)
        sd["model.mtp_layers.0.weight"] = torch.zeros(2)   # known-ignorable
        return sd
    copy_ckpt(path, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        MiMoVL.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "1 missing key(s): model.layers.1.mlp.down_proj.weight" in msg
    assert "1 unexpected key(s): model.extra_head.weight" in msg
    assert "model.layers.0.self_attn.k_proj.bias: checkpoint (7,)" in msg
    assert "mtp_layers" not in msg


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MiMoVL.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        MiMoVL.from_pretrained(tmp_path)
    json.dump(MiMoVLConfig.preset("tiny").to_hf_dict(), open(tmp_path / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        MiMoVL.from_pretrained(tmp_path)


def test_config_round_trip_both_layouts():
    cfg = MiMoVLConfig.preset("mimo-vl-7b")
    d = cfg.to_hf_dict()
    assert MiMoVLConfig.from_hf_dict(d) == cfg
    nested = {k: v for k, v in d.items() if k in ("vision_config", "text_config", "image_token_id")}
    assert MiMoVLConfig.from_hf_dict(nested).text == cfg.text
    bad = dict(d, vision_config=dict(d["vision_config"], out_hidden_size=123))
    with pytest.raises(ValueError, match="out_hidden_size=123"):
        MiMoVLConfig.from_hf_dict(bad)


# --- transformers 5.x (a second Python; .ci/run builds it and sets MIMOVL_TF5_PYTHON) -----------

TF5 = os.environ.get("MIMOVL_TF5_PYTHON")
needs_tf5 = pytest.mark.skipif(not TF5, reason="set MIMOVL_TF5_PYTHON to a Python with transformers 5.x "
                                               "(.ci/run does) to run the 5.x round trips")


def tf5(*args):
    import subprocess
    worker = os.path.join(os.path.dirname(__file__), "tf5_worker.py")
    r = subprocess.run([TF5, worker, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@needs_tf5
def test_transformers5_loads_ours(hf_saved, tmp_path):
    _, path = hf_saved
    ours = MiMoVL.from_pretrained(path)
    ours.save_pretrained(tmp_path / "ours")
    x, kw = inputs()
    save_file({"input_ids": x, **kw}, tmp_path / "in.safetensors")
    tf5("load", tmp_path / "ours", tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    assert (load_file(tmp_path / "out.safetensors")["logits"] - logits_of(ours)).abs().max() <= 1e-5


@needs_tf5
def test_transformers5_saved_loads_in_ours(hf_saved, tmp_path):
    hf, path = hf_saved
    tf5("save", path, tmp_path / "tf5")
    assert torch.equal(logits_of(MiMoVL.from_pretrained(tmp_path / "tf5")), logits_of(MiMoVL.from_pretrained(path)))

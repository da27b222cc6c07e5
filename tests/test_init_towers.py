"""MiMoVL.from_towers: the paper's start point (MiMo-VL report §2.1), Qwen2.5-ViT from a
Qwen2.5-VL checkpoint + a MiMo-7B-style text LM (with `model.mtp_layers.*`) + a fresh projector.

The sources are tiny random transformers-4.57 models saved here: a Qwen2_5_VLForConditionalGeneration
(tests/reference.py) for the ViT and a sharded Qwen2ForCausalLM, plus an extra shard of MTP tensors
as MiMo-7B-Base has, for the LM. The combined model must hold exactly their weights, a projector
drawn as MiMoVL's own init draws it, and give the Qwen2 LM's logits on text.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mimovl import MiMoVL, towers_plan
from reference import IMAGE, VEND, VIDEO, VSTART, hf_model, pixels, sequence
from test_checkpoint import to_tf5_layout

VOCAB, LM_HIDDEN = 256, 96          # the LM is wider than the ViT checkpoint's merger output (64)
VISION = {"<|vision_start|>": VSTART, "<|vision_end|>": VEND, "<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO}
N_MTP = 4                           # tensors in the fake MTP shard


def write_tokenizer(folder, size=VOCAB, tokens=VISION):
    """A word-level tokenizer.json: ids 0..size-1, the given special tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(size)}
    for token, i in tokens.items():
        vocab.pop(f"w{i}")
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save(os.path.join(folder, "tokenizer.json"))


def qwen2_lm(seed=2, tie=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=LM_HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=2048, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():               # norms at 1 and biases at 0 would hide a swapped weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def add_mtp_shard(folder, prefix="model."):
    """MiMo-7B-Base keeps its multi-token-prediction layer in `model.mtp_layers.0.*`."""
    mtp = {f"{prefix}mtp_layers.0.{name}": torch.randn(*shape) for name, shape in (
        ("input_proj.weight", (LM_HIDDEN, 2 * LM_HIDDEN)), ("token_layernorm.weight", (LM_HIDDEN,)),
        ("hidden_layernorm.weight", (LM_HIDDEN,)), ("self_attn.q_proj.weight", (LM_HIDDEN, LM_HIDDEN)))}
    assert len(mtp) == N_MTP
    save_file(mtp, os.path.join(folder, "model-mtp.safetensors"))
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    json.dump(index, open(index_path, "w"))


def source_tensors(folder):
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    vl = hf_model(seed=1)
    vl.save_pretrained(root / "vit")
    lm = qwen2_lm()
    lm.save_pretrained(root / "lm", max_shard_size="100KB")    # several shards + index, as MiMo-7B
    add_mtp_shard(root / "lm")
    write_tokenizer(root / "lm")
    return vl, lm, root


def copy_folder(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    return dst


def text_ids(seed=0, n=13):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(12, VOCAB, (2, n), generator=g)


def test_weights_come_from_each_tower(towers, capsys):
    _, lm, root = towers
    model = MiMoVL.from_towers(root / "vit", root / "lm", dtype=torch.float32)
    assert f"dropped {N_MTP} model.mtp_layers.* tensors" in capsys.readouterr().err
    ours = model.state_dict()
    vit_src = {k: v for k, v in source_tensors(root / "vit").items() if k.startswith("visual.")}  # 4.57 naming
    assert vit_src
    n_vit = 0
    for k, v in vit_src.items():
        if not k.startswith("visual.merger."):
            assert torch.equal(ours[k], v), k
            n_vit += 1
    assert n_vit == len([k for k in ours if k.startswith("visual.") and not k.startswith("visual.merger.")])
    lm_src = lm.state_dict()
    for k, v in lm_src.items():
        assert torch.equal(ours[k], v), k
    assert {k for k in ours if not k.startswith("visual.")} == set(lm_src)
    # fresh projector of the LM's width, not the checkpoint's
    merger = model.visual.merger
    assert merger.mlp[2].weight.shape == (LM_HIDDEN, 4 * 32)
    assert not torch.equal(merger.mlp[0].weight, vit_src["visual.merger.mlp.0.weight"])
    cfg = model.cfg
    assert (cfg.vision.out_hidden_size, cfg.text.hidden_size, cfg.text.vocab_size) == (LM_HIDDEN, LM_HIDDEN, VOCAB)
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (IMAGE, VIDEO, VSTART)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)     # from the LM's config.json
    assert cfg.text.max_position_embeddings == 2048
    assert cfg.text.mrope_section == [4, 4, 4]       # head_dim 24: Qwen2.5-VL's 2:3:3 split, rounded
    plan = towers_plan(root / "vit", root / "lm")      # what a sharded trainer reads, per rank
    assert plan.config == cfg and len(plan.dropped) == N_MTP
    assert set(plan.sources) == {k for k in ours if not k.startswith("visual.merger.")}
    assert len({file for file, _ in plan.sources.values()}) == 9       # 8 LM shards + the ViT file


def test_init_projector_on_a_meta_model_makes_only_the_projector_real(towers):
    _, _, root = towers
    with torch.device("meta"):
        model = MiMoVL(towers_plan(root / "vit", root / "lm").config)
    model.init_projector()
    real = {n for n, p in model.named_parameters() if not p.is_meta}
    assert real == {n for n, _ in model.named_parameters() if n.startswith("visual.merger.")}
    assert model.visual.merger.mlp[0].weight.device.type == "cpu"


def test_text_logits_equal_the_source_lm(towers):
    _, lm, root = towers
    model = MiMoVL.from_towers(root / "vit", root / "lm", dtype=torch.float32, progress=False)
    ids = text_ids()
    with torch.no_grad():
        ours, ref = model(ids).logits, lm(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # and the fresh projector feeds the wider LM: an image's tokens go through
    g = torch.Generator().manual_seed(0)
    seq, images, _ = sequence([3, ("image", (1, 4, 8)), 2], g)
    pv, grid = pixels(images, g)
    with torch.no_grad():
        logits = model(torch.tensor([seq]), pixel_values=pv, image_grid_thw=grid).logits
    assert logits.shape == (1, len(seq), VOCAB) and logits.isfinite().all()


def test_tied_lm(towers, tmp_path):
    _, _, root = towers
    lm = qwen2_lm(seed=3, tie=True)
    lm.save_pretrained(tmp_path / "lm")
    assert "lm_head.weight" not in load_file(tmp_path / "lm" / "model.safetensors")
    write_tokenizer(tmp_path / "lm")
    model = MiMoVL.from_towers(root / "vit", tmp_path / "lm", dtype=torch.float32, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = text_ids(1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, lm(ids).logits, rtol=1e-4, atol=1e-5)


def test_fresh_projector_is_drawn_as_the_model_init_draws_it(towers):
    _, _, root = towers
    torch.manual_seed(123)
    model = MiMoVL.from_towers(root / "vit", root / "lm", dtype=torch.bfloat16, progress=False)
    merger = model.visual.merger
    torch.manual_seed(123)            # by hand: normal(0, 0.02) per Linear weight, in module order
    w0 = torch.empty(merger.mlp[0].weight.shape).normal_(0, 0.02)
    w2 = torch.empty(merger.mlp[2].weight.shape).normal_(0, 0.02)
    assert merger.mlp[0].weight.dtype == torch.bfloat16
    assert torch.equal(merger.mlp[0].weight, w0.bfloat16()) and torch.equal(merger.mlp[2].weight, w2.bfloat16())
    assert not merger.mlp[0].bias.any() and not merger.mlp[2].bias.any()
    assert torch.equal(merger.ln_q.weight, torch.ones_like(merger.ln_q.weight))


def test_transformers5_naming_and_projector_from_vit(towers, tmp_path, capsys):
    """Both towers from Qwen2.5-VL folders in transformers-5 naming (model.visual.*,
    model.language_model.*), MTP tensors under the 5.x prefix, the ViT folder's projector kept."""
    vl, _, root = towers
    to_tf5_layout(root / "vit", tmp_path / "vit5")
    other = hf_model(seed=4)
    other.save_pretrained(tmp_path / "vl457")
    to_tf5_layout(tmp_path / "vl457", tmp_path / "lm5")
    sd = load_file(tmp_path / "lm5" / "model.safetensors")
    sd["model.language_model.mtp_layers.0.input_proj.weight"] = torch.randn(64, 128)
    save_file(sd, tmp_path / "lm5" / "model.safetensors")
    write_tokenizer(tmp_path / "lm5")
    model = MiMoVL.from_towers(tmp_path / "vit5", tmp_path / "lm5", projector_from_vit=True,
                               dtype=torch.float32)
    assert "dropped 1 model.mtp_layers.* tensors" in capsys.readouterr().err
    vit_src = source_tensors(tmp_path / "vit5")
    ours = model.state_dict()
    for k, v in vit_src.items():
        if k.startswith("model.visual."):
            assert torch.equal(ours[k[len("model."):]], v), k        # merger included
    ids = text_ids(2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_one_qwen25vl_folder_for_both_towers_is_today_init(towers):
    """from_towers(d, d) = from_pretrained(d) with a fresh projector (train_pretrain's --init d)."""
    _, _, root = towers
    whole = MiMoVL.from_pretrained(root / "vit", dtype=torch.float32, progress=False).state_dict()
    both = MiMoVL.from_towers(root / "vit", root / "vit", tokenizer_dir=root / "lm", dtype=torch.float32,
                              progress=False).state_dict()
    assert set(both) == set(whole)
    for k, v in whole.items():
        assert torch.equal(both[k], v) != k.startswith("visual.merger."), k     # the source perturbs all


def test_missing_unexpected_and_misshaped_lm_keys_are_listed_together(towers, tmp_path):
    _, _, root = towers

    def edit(folder):
        shards = [n for n in os.listdir(folder) if n.endswith(".safetensors") and "mtp" not in n]
        for name in shards:
            sd = load_file(folder / name)
            if "model.layers.1.mlp.down_proj.weight" in sd:
                sd.pop("model.layers.1.mlp.down_proj.weight")
                sd["model.extra_head.weight"] = torch.zeros(2)
            if "model.norm.weight" in sd:       # a checkpoint of another width
                sd["model.norm.weight"] = torch.ones(LM_HIDDEN + 1)
            save_file(sd, folder / name)
    lm = copy_folder(root / "lm", tmp_path / "lm", edit)
    with pytest.raises(ValueError) as e:
        MiMoVL.from_towers(root / "vit", lm, progress=False)
    msg = str(e.value)
    assert f"LM checkpoint {lm}:" in msg
    assert "1 missing key(s): model.layers.1.mlp.down_proj.weight" in msg
    assert "1 unexpected key(s): model.extra_head.weight" in msg
    assert f"1 wrong shape key(s): model.norm.weight: checkpoint ({LM_HIDDEN + 1},) vs model ({LM_HIDDEN},)" in msg
    assert "mtp_layers" not in msg and "ViT checkpoint" not in msg


def test_projector_from_vit_needs_matching_width(towers):
    _, _, root = towers
    with pytest.raises(ValueError, match=f"out_hidden_size=64, but the LM .* hidden_size={LM_HIDDEN}; "
                                         "start with a fresh projector"):
        MiMoVL.from_towers(root / "vit", root / "lm", projector_from_vit=True, progress=False)


@pytest.mark.parametrize("tokens, size, expected", [
    ({k: v for k, v in VISION.items() if k != "<|video_pad|>"}, VOCAB,
     r"no <\|video_pad\|>, which the config uses as video_token_id=11: add it to tokenizer.json's \"added_tokens\" "
     r"as \{\"id\": 11"),
    ({**VISION, "<|image_pad|>": 40}, VOCAB, r"<\|image_pad\|> is id 40 there, but the config uses image_token_id=10"),
    (VISION, VOCAB + 44, "token ids up to 299, but the LM's embedding has 256 rows"),
])
def test_tokenizer_must_fit(towers, tmp_path, tokens, size, expected):
    _, _, root = towers
    lm = copy_folder(root / "lm", tmp_path / "lm", lambda d: write_tokenizer(d, size, tokens))
    with pytest.raises(ValueError, match=expected):
        MiMoVL.from_towers(root / "vit", lm, progress=False)
    # a tokenizer elsewhere can be named instead of the LM folder's
    write_tokenizer(tmp_path)
    MiMoVL.from_towers(root / "vit", lm, tokenizer_dir=tmp_path, progress=False)


def test_end_of_text_id_must_be_in_the_tokenizer(towers, tmp_path):
    _, _, root = towers

    def eos(folder):
        cfg = json.load(open(folder / "config.json"))
        cfg["eos_token_id"] = [999, 2]
        json.dump(cfg, open(folder / "config.json", "w"))
    lm = copy_folder(root / "lm", tmp_path / "lm", eos)
    with pytest.raises(ValueError, match="it has no token 999, the config's eos_token_id"):
        MiMoVL.from_towers(root / "vit", lm, progress=False)


def test_missing_tokenizer_and_unsupported_lm_config(towers, tmp_path):
    _, _, root = towers
    lm = copy_folder(root / "lm", tmp_path / "lm", lambda d: os.remove(d / "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        MiMoVL.from_towers(root / "vit", lm, progress=False)

    def yarn(folder):
        cfg = json.load(open(folder / "config.json"))
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
        json.dump(cfg, open(folder / "config.json", "w"))
    lm = copy_folder(root / "lm", tmp_path / "yarn", yarn)
    with pytest.raises(ValueError, match="rope_scaling .* is not supported"):
        MiMoVL.from_towers(root / "vit", lm, progress=False)

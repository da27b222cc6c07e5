"""Parity of the model with transformers 4.57 `Qwen2_5_VLForConditionalGeneration` (fp32, CPU):
ViT output, final logits, M-RoPE position ids and rope_deltas, on tiny random checkpoints that the
test builds and saves itself."""

import pytest
import torch

from mimovl import MiMoVL, get_rope_index
from reference import hf_model, pixels, sequence

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_model(seed=0)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, MiMoVL.from_pretrained(path)


CASES = {
    "text_only": [17],
    # merged grid 5x7: neither side a multiple of the 4x4 window
    "one_image_odd_grid": [4, ("image", (1, 10, 14)), 6],
    "two_images": [3, ("image", (1, 10, 14)), 5, ("image", (1, 16, 8)), 2],
    "video_image_text": [2, ("video", (3, 6, 8)), 4, ("image", (1, 12, 10)), 3],
    # a large image: several windows in both directions and a full-attention block over 20x18 patches
    "large_image": [2, ("image", (1, 20, 18)), 2],
}


def run_both(hf, ours, parts, seed=0, spg=None):
    g = torch.Generator().manual_seed(seed)
    ids, imgs, vids = sequence(parts, g)
    pv, ig = pixels(imgs, g)
    pvv, vg = pixels(vids, g)
    spg = None if not vids else torch.tensor(spg or [1.0] * len(vids))
    x = torch.tensor([ids])
    kw = dict(pixel_values=pv, image_grid_thw=ig, pixel_values_videos=pvv, video_grid_thw=vg,
              second_per_grid_ts=spg)
    with torch.no_grad():
        ref = hf(input_ids=x, **kw).logits
        out = ours(x, **kw).logits
    return ref, out, (x, kw)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case):
    hf, ours = pair
    ref, out, _ = run_both(hf, ours, CASES[case])
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("grids", [[(1, 10, 14)], [(1, 10, 14), (1, 8, 8), (3, 6, 8)], [(1, 20, 18), (2, 4, 4)]])
def test_vit_matches_transformers(pair, grids):
    hf, ours = pair
    pv, grid = pixels([list(g) for g in grids], torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=grid)
        out = ours.visual(pv, grid)
    assert out.shape == ref.shape == (sum(t * h * w for t, h, w in grids) // 4, 64)
    assert (out - ref).abs().max() <= TOL


def test_left_padded_batch(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(3)
    a, ia, _ = sequence([3, ("image", (1, 10, 14)), 5], g)
    b, ib, vb = sequence([2, ("video", (2, 4, 8)), 3, ("image", (1, 8, 8)), 2], g)
    L = max(len(a), len(b))
    ids = torch.tensor([[0] * (L - len(a)) + a, [0] * (L - len(b)) + b])
    mask = torch.tensor([[0] * (L - len(a)) + [1] * len(a), [0] * (L - len(b)) + [1] * len(b)])
    pv, ig = pixels(ia + ib, g)
    pvv, vg = pixels(vb, g)
    kw = dict(attention_mask=mask, pixel_values=pv, image_grid_thw=ig, pixel_values_videos=pvv,
              video_grid_thw=vg, second_per_grid_ts=torch.tensor([1.0]))
    with torch.no_grad():
        ref = hf(input_ids=ids, **kw).logits
        out = ours(ids, **kw).logits
    valid = mask.bool()
    assert (out[valid] - ref[valid]).abs().max() <= TOL
    # the positions and deltas of the whole padded batch equal the classic rule
    ref_pos, ref_delta = hf.model.get_rope_index(ids, ig, vg, torch.tensor([1.0]), mask)
    for row in range(2):
        grids_i = ia if row == 0 else ib
        pos, delta, _, _ = get_rope_index(ids[row][valid[row]], ours.cfg,
                                          torch.tensor(grids_i), torch.tensor(vb) if row else None,
                                          torch.tensor([1.0]))
        assert torch.equal(pos, ref_pos[:, row, valid[row]])
        # classic rope_delta is measured against the padded length
        assert delta - int((~valid[row]).sum()) == int(ref_delta[row])


@pytest.mark.parametrize("spg", [1.0, 2.0])
def test_rope_index_after_video(pair, spg):
    """Text after a video resumes at max id + 1 (classic 4.57 rule), also with 2 s per group."""
    hf, ours = pair
    g = torch.Generator().manual_seed(4)
    ids, imgs, vids = sequence([3, ("video", (4, 4, 4)), 5, ("image", (1, 4, 6)), 2], g)
    x = torch.tensor([ids])
    ig, vg = torch.tensor(imgs), torch.tensor(vids)
    ref_pos, ref_delta = hf.model.get_rope_index(x, ig, vg, torch.tensor([spg]), None)
    pos, delta, n_img, n_vid = get_rope_index(x[0], ours.cfg, ig, vg, torch.tensor([spg]))
    assert (n_img, n_vid) == (1, 1)
    assert torch.equal(pos, ref_pos[:, 0])
    assert delta == int(ref_delta[0])
    # hand-checked: video starts at s=4 (3 text + vision_start), t ids 4, 4+2spg, ...; text after
    # the video (its vision_end token) starts at max + 1
    t_last = 4 + int(3 * spg * 2)
    after = 3 + 1 + 4 * 2 * 2  # 3 text, vision_start, 4 groups x 2x2 merged tokens -> vision_end
    assert pos[0, after] == t_last + 1


def test_rope_index_spec_example():
    """get_rope_index worked example (transformers modeling_qwen2_5_vl.py): a b c <vs> [grid (1,4,6)] <ve> d e."""
    from mimovl import MiMoVLConfig
    cfg = MiMoVLConfig.preset("tiny")
    ids = torch.tensor([20, 21, 22, cfg.vision_start_token_id] + [cfg.image_token_id] * 6 +
                       [cfg.vision_end_token_id, 23, 24])
    pos, delta, _, _ = get_rope_index(ids, cfg, torch.tensor([[1, 4, 6]]))
    assert pos.tolist() == [[0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9],
                            [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9],
                            [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9]]
    assert delta == -3


def test_loss_matches_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(5)
    ids, imgs, _ = sequence([4, ("image", (1, 8, 10)), 9], g)
    x = torch.tensor([ids])
    labels = x.clone()
    labels[:, :8] = -100
    pv, ig = pixels(imgs, g)
    with torch.no_grad():
        ref = hf(input_ids=x, pixel_values=pv, image_grid_thw=ig, labels=labels).loss
        out = ours(x, pixel_values=pv, image_grid_thw=ig, labels=labels)
    assert out.logits is None
    assert abs(float(out.loss) - float(ref)) <= 1e-5


def test_packed_documents_match_separate_runs(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(6)
    docs = [sequence([3, ("image", (1, 8, 8)), 4], g), sequence([6], g), sequence([2, ("video", (2, 4, 4)), 2], g)]
    singles = []
    all_ids, all_img, all_vid = [], [], []
    for ids, imgs, vids in docs:
        pv, ig = pixels(imgs, g)
        pvv, vg = pixels(vids, g)
        with torch.no_grad():
            singles.append(ours(torch.tensor([ids]), pixel_values=pv, image_grid_thw=ig,
                                pixel_values_videos=pvv, video_grid_thw=vg).logits[0])
        all_ids += ids
        all_img += [(pv, ig)] if pv is not None else []
        all_vid += [(pvv, vg)] if pvv is not None else []
    cu = torch.tensor([0, len(docs[0][0]), len(docs[0][0]) + len(docs[1][0]), len(all_ids)])
    with torch.no_grad():
        packed = ours(torch.tensor([all_ids]), cu_seqlens=cu,
                      pixel_values=torch.cat([p for p, _ in all_img]), image_grid_thw=torch.cat([g_ for _, g_ in all_img]),
                      pixel_values_videos=torch.cat([p for p, _ in all_vid]),
                      video_grid_thw=torch.cat([g_ for _, g_ in all_vid])).logits[0]
    assert (packed - torch.cat(singles)).abs().max() <= TOL


# --- user-facing errors ---------------------------------------------------------------------

def test_errors_for_inconsistent_inputs(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(7)
    ids, imgs, _ = sequence([2, ("image", (1, 8, 8)), 2], g)
    pv, ig = pixels(imgs, g)
    x = torch.tensor([ids])
    with pytest.raises(ValueError, match="patch rows but grid_thw"):
        ours(x, pixel_values=pv[:-4], image_grid_thw=ig)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        ours(x, pixel_values=torch.randn(63, 1176), image_grid_thw=torch.tensor([[1, 7, 9]]))
    with pytest.raises(ValueError, match="placeholder"):
        ours(torch.tensor([ids[:-5] + ids[-2:]]), pixel_values=pv, image_grid_thw=ig)
    with pytest.raises(ValueError, match="no image pixels"):
        ours(x)


def test_config_errors():
    from mimovl import MiMoVLConfig
    cfg = MiMoVLConfig.preset("tiny")
    cfg.text.mrope_section = [8, 8, 8]
    with pytest.raises(ValueError, match="mrope_section"):
        cfg.validate()
    with pytest.raises(ValueError, match="unknown preset"):
        MiMoVLConfig.preset("huge")
    cfg = MiMoVLConfig.preset("tiny")
    cfg.vision.fullatt_block_indexes = [9]
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        cfg.validate()


def test_presets():
    from mimovl import MiMoVLConfig
    with torch.device("meta"):
        m = MiMoVL(MiMoVLConfig.preset("mimo-vl-7b"))
    # the official configuration: 8,301,791,232 parameters (16.6 GB in bf16)
    assert sum(p.numel() for p in m.parameters()) == 8_301_791_232

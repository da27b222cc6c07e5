"""illustrate.py: the drawn windows are vit.window_layout's windows (including grids whose merged
size is not a multiple of the window, and videos), and the drawn M-RoPE ids are
mimovl.get_rope_index's, which themselves follow the hand rule (text +1, image rows / columns)."""

import math
import os

import pytest
import torch
from PIL import Image

import illustrate
import synthetic
from mimovl import MiMoVLConfig, get_rope_index
from processor import Processor
from vit import VisionConfig, window_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("matplotlib")


@pytest.mark.parametrize("grid", [(1, 8, 8), (1, 22, 22), (1, 16, 24), (1, 10, 14), (2, 10, 14)])
def test_window_map_is_vit_window_layout(grid):
    vision = VisionConfig()
    layout = illustrate.patch_layout(grid, vision)
    t, lh, lw = layout["merged"]
    assert (t, lh, lw) == (grid[0], grid[1] // 2, grid[2] // 2)
    window_of = layout["window_of"]
    # listing the merged tokens window by window, raster order inside each, gives vit's permutation
    window_index, cu = window_layout(torch.tensor([grid]), 2, 4)
    assert torch.equal(torch.sort(window_of.flatten(), stable=True).indices, window_index)
    assert torch.bincount(window_of.flatten()).tolist() == ((cu[1:] - cu[:-1]) // 4).tolist()
    # and both are the 112-px windows by hand: 4x4 merged tokens, partial ones at the bottom/right
    nh, nw = math.ceil(lh / 4), math.ceil(lw / 4)
    frame, row, col = torch.meshgrid(torch.arange(t), torch.arange(lh), torch.arange(lw), indexing="ij")
    assert torch.equal(window_of, frame * nh * nw + (row // 4) * nw + col // 4)


def test_drawn_borders_are_the_window_borders():
    image = Image.new("RGB", (196, 140), "white")            # 10x14 patches -> 5x7 merged tokens
    fig, layout = illustrate.draw_image_patches(image, VisionConfig())
    assert layout["merged"] == (1, 5, 7)
    # by hand: windows are columns 0-3 | 4-6 and rows 0-3 | 4: 5 vertical + 7 horizontal unit edges
    borders = illustrate.window_borders(layout["window_of"][0])
    assert sorted(borders) == sorted([((4, r), (4, r + 1)) for r in range(5)] + [((c, 4), (c + 1, 4)) for c in range(7)])
    drawn = next(c for c in fig.axes[0].collections if c.get_gid() == "windows")
    segments = sorted(s.tolist() for s in drawn.get_segments())
    expected = [[[x0 * 28, y0 * 28], [x1 * 28, y1 * 28]] for (x0, y0), (x1, y1) in borders]
    expected += [[[0, 0], [196, 0]], [[196, 0], [196, 140]], [[196, 140], [0, 140]], [[0, 140], [0, 0]]]
    assert segments == sorted(expected)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(synthetic.train_tokenizer(str(tmp_path_factory.mktemp("tok")), n_samples=300))


def test_mrope_planes_are_get_rope_index(processor):
    cfg = MiMoVLConfig.preset("tiny")
    image = Image.new("RGB", (84, 56), "red")                 # 6x4 patches -> 3x2 merged tokens
    video = [Image.new("RGB", (56, 56), c) for c in ("red", "green", "blue", "white")]
    planes = illustrate.mrope_planes(processor, cfg, image, video)
    # the same prompt through the processor and get_rope_index directly
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "video", "video": video},
                                         {"type": "text", "text": "What happens in the video?"}]}]
    batch = processor(conv)
    want, _, _, _ = get_rope_index(batch["input_ids"][0], cfg, batch["image_grid_thw"], batch["video_grid_thw"],
                                   batch["second_per_grid_ts"])
    assert torch.equal(planes["position_ids"], want)
    (_, s_img, grid_img), (_, s_vid, grid_vid) = planes["spans"]
    assert planes["spans"][0][0] == "image" and planes["spans"][1][0] == "video"
    assert batch["input_ids"][0][s_img] == cfg.image_token_id and batch["input_ids"][0][s_vid] == cfg.video_token_id
    # hand rule: text before the image counts 0..s-1 on all three; image t = s, h = s + row, w = s + col
    assert torch.equal(want[:, :s_img], torch.arange(s_img).expand(3, -1))
    t_ids, h_ids, w_ids = illustrate.span_planes(planes, planes["spans"][0])
    lh, lw = grid_img[1:]
    assert (t_ids == s_img).all()
    assert torch.equal(h_ids, s_img + torch.arange(lh).view(-1, 1).expand(lh, lw))
    assert torch.equal(w_ids, s_img + torch.arange(lw).view(1, -1).expand(lh, lw))
    # the video's second temporal patch is 1 s later: tokens_per_second (2) ids further on t
    assert grid_vid[0] == 2
    v0, v1 = illustrate.span_planes(planes, planes["spans"][1], 0), illustrate.span_planes(planes, planes["spans"][1], 1)
    assert ((v1[0] - v0[0]) == 2).all() and torch.equal(v1[1:], v0[1:])
    # the picture plots exactly these ids
    fig = illustrate.draw_mrope(planes, cfg.vision.tokens_per_second)
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    for i, name in enumerate(("temporal", "height", "width")):
        assert list(lines[name]) == want[i].tolist()
    heat = fig.axes[1].get_images()[0].get_array()
    assert heat.tolist() == t_ids.tolist()


def test_cli_writes_three_pictures_and_refuses_bad_input(tmp_path, capsys):
    written = illustrate.main([os.path.join(ROOT, "data", "images", "digits.png"), "--out", str(tmp_path)])
    assert [os.path.basename(p) for p in written] == ["patches.png", "video_patches.png", "mrope.png"]
    assert all(os.path.getsize(p) > 0 for p in written)
    for argv, message in (([str(tmp_path / "missing.png")], "image file not found"),
                          ([written[0], "--video", str(tmp_path / "no-clip")], "--video"),
                          ([written[0], "--model", str(tmp_path)], "no config.json")):
        with pytest.raises(SystemExit) as e:
            illustrate.main(argv + ["--out", str(tmp_path)])
        assert e.value.code == 2 and message in capsys.readouterr().err

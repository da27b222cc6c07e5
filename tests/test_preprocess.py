"""Image and video preprocessing (processor.py §1; qwen-vl-utils vision_process.py, Qwen2VLImageProcessor).

Images are checked against the official pipeline: qwen-vl-utils' fetch_image (load, RGBA on white,
smart_resize, PIL bicubic) followed by transformers 4.57's slow Qwen2VLImageProcessor (rescale,
normalise, patchify). transformers' video processor needs torchvision, which does not install beside
the CPU torch build (found when this project set up its environment), so videos are checked against
cases computed by hand from qwen-vl-utils' fetch_video / smart_nframes formulas and the patch order of
Qwen2VLImageProcessor.

    python -m pytest tests/test_preprocess.py
"""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor
from processor import CLIP_MEAN, CLIP_STD, MIMO_MAX_PIXELS, load_image, preprocess_image, preprocess_video, sample_frame_indices, smart_nframes, smart_resize, video_frame_range, video_frame_size




def load_qwen_vl_utils():
    """Import qwen_vl_utils.vision_process. It imports torchvision at load time although its image path
    uses only PIL; torchvision does not import beside the CPU torch build, so a stand-in module is put in
    sys.modules for the import only, then removed so nothing else sees it."""
    names = ("torchvision", "torchvision.io", "torchvision.transforms")
    saved = {name: sys.modules.get(name) for name in names}
    torchvision = types.ModuleType("torchvision")
    torchvision.__version__ = "0.0.0"
    torchvision.io = types.ModuleType("torchvision.io")
    torchvision.transforms = types.ModuleType("torchvision.transforms")
    torchvision.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    sys.modules.update({"torchvision": torchvision, "torchvision.io": torchvision.io,
                        "torchvision.transforms": torchvision.transforms})
    try:
        import qwen_vl_utils.vision_process as qvu
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return qvu


qvu = load_qwen_vl_utils()
# The Qwen2.5-VL hub preprocessor_config budget, so the HF processor does not resize a second time.
HF_IMAGE_PROCESSOR = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)


def photo(height, width, seed, channels=3):
    """A photograph-like uint8 image: smooth lighting, texture, a few hard-edged objects and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, channels))
    for c in range(channels):
        a, b, f = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * (a * y / height + b * x / width) + 25 * np.sin(x * f / 7 + y / 11)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(3, max(4, min(height, width) / 3))
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, channels)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def reference(element):
    """qwen-vl-utils fetch_image + transformers Qwen2VLImageProcessor -> (pixel_values, grid_thw)."""
    out = HF_IMAGE_PROCESSOR(images=[qvu.fetch_image(element)], return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def assert_matches_reference(source, ref_source=None, **options):
    pixel_values, grid = preprocess_image(source, **options)
    ref_values, ref_grid = reference({"image": source if ref_source is None else ref_source, **options})
    assert grid == ref_grid
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == ref_values.shape
    assert np.abs(pixel_values.numpy() - ref_values).max() <= 1e-6
    assert pixel_values.shape[0] == grid[1] * grid[2]


# ---- smart_resize ----------------------------------------------------------------------------------
def test_smart_resize_matches_qwen_vl_utils_on_a_sweep():
    rng = np.random.default_rng(0)
    sizes = [(20, 20), (599, 540), (1544, 1886), (14, 14), (42, 42), (70, 70), (3000, 20), (1, 150)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(2000)]
    budgets = [(3136, 12845056), (3136, 4096 * 784), (100352, 602112), (56 * 56, 28 * 28 * 1280)]
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in budgets:
            assert smart_resize(h, w, 28, lo, hi) == qvu.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
            checked += 1
    assert checked > 5000
    # Worked examples of qwen-vl-utils' smart_resize (H, W order): 540x599 (WxH) -> 532x588; MiMo's GUI screenshot at
    # 4096*28^2 -> 1876x1540.
    assert smart_resize(599, 540) == (588, 532)
    assert smart_resize(1544, 1886, max_pixels=MIMO_MAX_PIXELS) == (1540, 1876)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError):  # the reference rejects it too
        qvu.smart_resize(10, 2010, 28)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(np.zeros((4, 900, 3), np.uint8))
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(100, 100, min_pixels=5000, max_pixels=4000)


# ---- images against qwen-vl-utils + Qwen2VLImageProcessor --------------------------------------------
@pytest.mark.parametrize("height,width,options", [
    (599, 540, {}),  # the notebook's dog photo size
    (333, 217, {}),
    (701, 899, {"max_pixels": 200_000}),  # downscale branch
    (120, 90, {"min_pixels": 100_000}),  # upscale branch, per-image min_pixels
    (257, 313, {"resized_height": 300, "resized_width": 250}),
    (20, 20, {}),  # tiny
    (20, 3000, {}),  # very wide (aspect 150)
    (2900, 17, {}),  # very tall
])
def test_jpeg_photos_match_official_pipeline(tmp_path, height, width, options):
    path = tmp_path / "photo.jpg"
    Image.fromarray(photo(height, width, seed=height * width)).save(path, quality=90)
    assert_matches_reference(str(path), **options)


def test_rgba_png_is_composited_on_white_like_official_pipeline(tmp_path):
    rgba = photo(211, 297, seed=3, channels=4)
    rgba[:80, :, 3] = 0  # fully transparent band -> must become white
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert_matches_reference(str(path))
    pixel_values, _ = preprocess_image(str(path))
    white = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    first = pixel_values[0].reshape(3, 2, 14, 14).numpy()  # top-left patch, inside the transparent band
    assert np.allclose(first, white[:, None, None, None], atol=1e-5)
    # The same RGBA pixels given as an array, as a PIL image and as bytes.
    assert_matches_reference(rgba, ref_source=Image.fromarray(rgba, "RGBA"))
    assert_matches_reference(Image.fromarray(rgba, "RGBA"))
    via_bytes, _ = preprocess_image(path.read_bytes())
    assert torch.equal(via_bytes, pixel_values)


def test_grayscale_and_palette_images_match_official_pipeline():
    gray = photo(150, 230, seed=5)[..., 0]
    assert_matches_reference(gray, ref_source=Image.fromarray(gray))
    assert_matches_reference(Image.fromarray(photo(90, 130, seed=6)).convert("P"))


def test_image_patch_order_is_block_major_over_merge_blocks():
    """Qwen2VLImageProcessor's patch order by hand: rows run over merged rows, merged cols, then the 2x2 sub-patches; each row is
    (channel, frame-in-pair, y, x) with the single image frame repeated."""
    img = photo(56, 84, seed=7)  # already on the 28-grid and within budget: no resize
    pixel_values, grid = preprocess_image(img)
    assert grid == (1, 4, 6)
    norm = ((img / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    expected = []
    for merged_row in range(2):
        for merged_col in range(3):
            for sub_row in range(2):
                for sub_col in range(2):
                    y0, x0 = (2 * merged_row + sub_row) * 14, (2 * merged_col + sub_col) * 14
                    patch = norm[:, y0:y0 + 14, x0:x0 + 14]
                    expected.append(np.stack([patch, patch], axis=1).reshape(-1))  # (c, t, y, x)
    assert np.abs(pixel_values.numpy() - np.stack(expected)).max() < 1e-5


def test_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(str(missing))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a PNG")
    with pytest.raises(ValueError, match="corrupt.png"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(photo(200, 200, seed=1)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:600])
    with pytest.raises(ValueError, match="truncated.jpg"):
        load_image(truncated)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="resized_width"):
        preprocess_image(photo(60, 60, seed=2), resized_height=56)


# ---- videos: hand-computed cases (qwen-vl-utils fetch_video) ---------------------------------------------
@pytest.mark.parametrize("total,video_fps,options,expected", [
    (30, 10, {}, 6),  # 3 s at 2 fps
    (100, 30, {}, 6),  # 6.67 -> floor to even
    (3000, 30, {}, 200),
    (100000, 30, {}, 768),  # FPS_MAX_FRAMES
    (300, 30, {"fps": 1.0}, 10),
    (5, 1, {}, 4),  # 10 wanted, capped by the video (floor to even)
    (3, 1, {}, 2),  # max_frames = floor2(3) = 2 beats min_frames 4
    (40, 30, {}, 4),  # 2.67 -> raised to min_frames 4
    (30, 10, {"min_frames": 9}, 10),  # min_frames rounds up to even
    (30, 10, {"max_frames": 5}, 4),
    (30, 10, {"nframes": 7}, 8),  # round(3.5) = 4 pairs
    (30, 10, {"nframes": 5}, 4),  # round(2.5) = 2 pairs: banker's rounding
])
def test_smart_nframes_hand_cases(total, video_fps, options, expected):
    assert smart_nframes(total, video_fps, **options) == expected


def test_smart_nframes_errors():
    with pytest.raises(ValueError, match="single frame"):
        smart_nframes(1, 30)
    with pytest.raises(ValueError, match="not both"):
        smart_nframes(30, 10, fps=2, nframes=4)
    with pytest.raises(ValueError, match="between"):
        smart_nframes(30, 10, nframes=40)


def test_frame_indices_range_and_frame_size_hand_cases():
    # linspace(0, 29, 6) = 0, 5.8, 11.6, 17.4, 23.2, 29
    assert sample_frame_indices(0, 29, 6) == [0, 6, 12, 17, 23, 29]
    assert sample_frame_indices(0, 9, 4) == [0, 3, 6, 9]
    # 2.05 s * 10 fps = 20.5 -> frame 21 (rounds up); 5.0 s -> frame 50
    assert video_frame_range(100, 10, video_start=2.05, video_end=5.0) == (21, 50, 30)
    assert video_frame_range(100, 10) == (0, 99, 100)
    with pytest.raises(ValueError, match="select no frames"):
        video_frame_range(100, 10, video_start=6, video_end=5)
    # 224x336 = 75264 px is under the 128*28^2 = 100352 per-frame minimum: scale by sqrt(100352/75264)
    # = 1.1547: 258.7 -> 10*28 = 280, 388.0 -> 14*28 = 392.
    assert video_frame_size(224, 336, nframes=6) == (280, 392)
    # 768 frames of 1080p: budget 90316800/768*2 = 235200 px; beta = sqrt(1080*1920/235200) = 2.9692;
    # 1080/beta = 363.7 -> 12*28 = 336, 1920/beta = 646.6 -> 23*28 = 644.
    assert video_frame_size(1080, 1920, nframes=768) == (336, 644)
    # total_pixels 2e6 over 20 frames: budget 200000 < 448^2 = 200704; 448/1.00176 = 447.2 -> 15*28 = 420.
    assert video_frame_size(448, 448, nframes=20, total_pixels=2_000_000) == (420, 420)
    # The budget never falls below 1.05 * min_pixels = 105369 (here 768 frames * 50000 px would allow
    # 100000): beta = sqrt(1080*1920/105369) = 4.4361; 243.5 -> 8*28 = 224, 432.8 -> 15*28 = 420.
    assert video_frame_size(1080, 1920, nframes=768, total_pixels=768 * 50000) == (224, 420)
    # A user max_pixels only lowers the budget: 602112 stays the cap at 6 frames.
    assert video_frame_size(1080, 1920, nframes=6, max_pixels=10**9) == smart_resize(
        1080, 1920, min_pixels=100352, max_pixels=602112)


def denormalize_channel0(pixel_values):
    """Red channel of every (row, frame-in-pair) back in 0-255, from the fused video normalisation."""
    red = pixel_values.reshape(pixel_values.shape[0], 3, 2, 14 * 14)[:, 0]
    return red.double() * (255 * CLIP_STD[0]) + 255 * CLIP_MEAN[0]


def test_video_array_sampling_sizes_and_timing():
    # 30 frames at 10 fps, frame i a flat grey of 8*i: 3 s -> 6 frames at indices 0 6 12 17 23 29.
    frames = np.stack([np.full((112, 112, 3), 8 * i, np.uint8) for i in range(30)])
    pixel_values, grid, second_per_grid = preprocess_video(frames, video_fps=10)
    # 112x112 is below the per-frame minimum: 12544 -> scale sqrt(8) = 2.83: 316.8 -> 12*28 = 336.
    assert grid == (3, 24, 24) and pixel_values.shape == (3 * 24 * 24, 1176)
    assert second_per_grid == 1.0  # 2 frames / (6 frames / 3 s)
    red = denormalize_channel0(pixel_values).reshape(3, 24 * 24, 2, 196)
    for group, pair in enumerate([(0, 6), (12, 17), (23, 29)]):
        for t, index in enumerate(pair):
            assert torch.allclose(red[group, :, t], torch.tensor(8.0 * index, dtype=torch.float64), atol=1e-3)
    # A window of the video, and a target fps: [1.0 s, 2.5 s] = frames 10..25 (16), at 4 fps -> 6 frames.
    pixel_values, grid, second_per_grid = preprocess_video(frames, video_fps=10, video_start=1.0,
                                                                 video_end=2.5, fps=4)
    assert grid == (3, 24, 24)
    assert second_per_grid == pytest.approx(2 / (6 / 16 * 10))
    red = denormalize_channel0(pixel_values).reshape(3, 576, 2, 196)[:, 0, :, 0]
    assert red.round().tolist() == [[8.0 * i for i in pair] for pair in [(10, 13), (16, 19), (22, 25)]]


def test_video_frame_list_patch_order_and_odd_padding():
    """Five already-sampled frames: padded to six by repeating the last; rows ordered (temporal group,
    merged row, merged col, sub-row, sub-col), each (channel, frame-in-pair, y, x), as Qwen2VLImageProcessor."""
    frames = [photo(308, 336, seed=10 + i) for i in range(5)]  # 103488 px: within both budgets, no resize
    pixel_values, grid, second_per_grid = preprocess_video([Image.fromarray(f) for f in frames])
    assert grid == (3, 22, 24)
    assert second_per_grid == 1.0  # frame lists are taken at sample_fps, default 2
    norm = [((f / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1) for f in frames]
    norm.append(norm[-1])
    expected = []
    for group in range(3):
        for merged_row in range(11):
            for merged_col in range(12):
                for sub_row in range(2):
                    for sub_col in range(2):
                        y0, x0 = (2 * merged_row + sub_row) * 14, (2 * merged_col + sub_col) * 14
                        pair = [norm[2 * group + t][:, y0:y0 + 14, x0:x0 + 14] for t in range(2)]
                        expected.append(np.stack(pair, axis=1).reshape(-1))
    assert np.abs(pixel_values.numpy() - np.stack(expected)).max() < 1e-5
    _, _, second_per_grid = preprocess_video([Image.fromarray(f) for f in frames[:2]], sample_fps=1.0)
    assert second_per_grid == 2.0


def test_video_folder_in_natural_order(tmp_path):
    for number, value in [(1, 10), (2, 20), (10, 30)]:
        Image.fromarray(np.full((336, 336, 3), value, np.uint8)).save(tmp_path / f"frame_{number}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    pixel_values, grid, _ = preprocess_video(str(tmp_path))
    assert grid == (2, 24, 24)  # 3 frames padded to 4
    red = denormalize_channel0(pixel_values).reshape(2, 576, 2, 196)[:, 0, :, 0]
    assert red.round().tolist() == [[10.0, 20.0], [30.0, 30.0]]


def test_video_file_with_av(tmp_path):
    av = pytest.importorskip("av", reason="reading video files needs the optional 'av' package")
    path = tmp_path / "clip.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=10)  # lossless, so frame identity survives
        stream.width, stream.height, stream.pix_fmt = 112, 84, "rgb24"
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((84, 112, 3), 8 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    pixel_values, grid, second_per_grid = preprocess_video(str(path))
    # 84x112 = 9408 px -> scale sqrt(100352/9408) = 3.266: 274.3 -> 280, 365.8 -> 392.
    assert grid == (3, 20, 28)
    assert second_per_grid == pytest.approx(1.0)
    red = denormalize_channel0(pixel_values).reshape(3, 20 * 28, 2, 196)[:, 0, :, 0]
    assert red.round().tolist() == [[8.0 * i for i in pair] for pair in [(0, 6), (12, 17), (23, 29)]]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        preprocess_video(str(corrupt))


def test_video_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no frames"):
        preprocess_video(str(tmp_path))  # empty folder
    with pytest.raises(ValueError, match="no frames"):
        preprocess_video([])
    with pytest.raises(ValueError, match="no frames"):
        preprocess_video(np.zeros((0, 56, 56, 3), np.uint8), video_fps=30)
    with pytest.raises(ValueError, match="video_fps"):
        preprocess_video(np.zeros((8, 56, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="single frame"):
        preprocess_video(np.zeros((1, 56, 56, 3), np.uint8), video_fps=30)
    with pytest.raises(ValueError, match="one size"):
        preprocess_video([np.zeros((56, 56, 3), np.uint8), np.zeros((84, 56, 3), np.uint8)])
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        preprocess_video(str(tmp_path / "missing.mp4"))
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ImportError, match="pip install av"):
        preprocess_video(str(tmp_path / "clip.mp4"))

"""Training data: CSV and folder datasets from real .mp4/.gif files, sampling, bad data, latent cache."""

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from animatediff_lite.toy import synthetic as S
from animatediff_lite.train import data as D
from animatediff_lite.train.config import DataSection
from tests.toy_files import write_dataset, write_video_file


@pytest.fixture(scope="module")
def csv_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    return write_dataset(root, S.all_specs()[:6], frames=12, size=48, fmt="mp4")


def test_csv_dataset_samples(csv_set):
    ds = D.build_video_dataset(DataSection(csv=str(csv_set), frames=4, stride=2, size=32), seed=1)
    assert len(ds) == 6
    s = ds[2]
    assert s["video"].shape == (3, 4, 32, 32) and s["video"].dtype == torch.float32
    assert -1 <= s["video"].min() and s["video"].max() <= 1 and s["video"].min() < -0.5
    assert s["caption"] == S.all_specs()[2].caption and s["skipped"] == 0 and s["index"] == 2
    again = ds[2]
    assert torch.equal(s["video"], again["video"]) and s["sample_seed"] == again["sample_seed"]
    ds.set_epoch(1)
    other = ds[2]
    assert other["sample_seed"] != s["sample_seed"]
    # frames follow the video: the stride-2 window of the rendered clip, resized 48 -> 32
    ref = torch.from_numpy(S.render_clip(S.all_specs()[2], 12, 48, seed=2)) * 2 - 1
    ref = torch.nn.functional.interpolate(ref, size=(32, 32), mode="bilinear", antialias=True)
    errs = [(s["video"].permute(1, 0, 2, 3) - ref[k:k + 7:2]).abs().mean().item() for k in range(6)]
    assert min(errs) < 0.02, errs


def test_workers_match_main_process(csv_set):
    ds = D.build_video_dataset(DataSection(csv=str(csv_set), frames=4, stride=2, size=16), seed=0)
    main = [b["video"] for b in DataLoader(ds, batch_size=3, num_workers=0)]
    work = [b["video"] for b in DataLoader(ds, batch_size=3, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(main, work, strict=True))


def test_folder_of_gifs_and_empty_caption(tmp_path, caplog):
    folder = write_dataset(tmp_path, S.all_specs()[:3], frames=6, size=24, fmt="gif", layout="folder")
    (folder / "clip_000001.txt").write_text("  \n")
    (folder / "clip_000002.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="animatediff_lite.train"):
        ds = D.build_video_dataset(DataSection(folder=str(folder), frames=6, stride=1, size=24))
    assert len(ds) == 1 and ds[0]["caption"] == S.all_specs()[0].caption
    assert "clip_000001.txt: empty caption file" in caplog.text
    assert "clip_000002.gif: no caption file clip_000002.txt" in caplog.text
    assert len(D.read_folder_index(folder)[1]) == 2


def test_short_clips_lower_the_stride_or_are_skipped(tmp_path, caplog):
    spec = S.all_specs()[0]
    write_video_file(S.render_clip(spec, 7, 16, seed=0), tmp_path / "a" / "short.gif")
    write_video_file(S.render_clip(spec, 3, 16, seed=0), tmp_path / "a" / "tiny.gif")
    rng = np.random.default_rng(0)
    assert D.frame_indices(7, 4, 4, rng) == [0, 2, 4, 6]  # stride 4 needs 13 frames: lowered to 2
    idx = D.frame_indices(100, 16, 4, rng)
    assert np.all(np.diff(idx) == 4) and 0 <= idx[0] and idx[-1] < 100
    with pytest.raises(D.UnreadableVideo, match="fewer than"):
        D.frame_indices(3, 4, 1, rng)
    items = [D.VideoItem(str(tmp_path / "a" / n), "x", n) for n in ("tiny.gif", "short.gif")]
    ds = D.VideoDataset(items, frames=4, stride=4, size=16)
    with caplog.at_level(logging.WARNING, logger="animatediff_lite.train"):
        s = ds[0]
    assert s["skipped"] == 1 and "tiny.gif" in caplog.text and "fewer than the 4 needed" in caplog.text


def test_missing_and_corrupt_videos_are_skipped_and_counted(tmp_path, caplog):
    csv_path = write_dataset(tmp_path, S.all_specs()[:4], frames=6, size=16, fmt="mp4")
    (tmp_path / "000" / "000001.mp4").unlink()
    (tmp_path / "000" / "000002.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    ds = D.build_video_dataset(DataSection(csv=str(csv_path), frames=4, stride=1, size=16))
    with caplog.at_level(logging.WARNING, logger="animatediff_lite.train"):
        loader = DataLoader(ds, batch_size=4)
        batch = next(iter(loader))
    assert batch["skipped"].tolist() == [0, 2, 1, 0]  # 1 -> (1, 2 bad) -> 3; 2 -> 3
    assert batch["caption"][1] == batch["caption"][3] == S.all_specs()[3].caption
    assert "000001.mp4 (videos.csv row 3): no such file" in caplog.text
    assert "000002.mp4 (videos.csv row 4): cannot be decoded" in caplog.text
    assert caplog.text.count("000002.mp4") == 1  # one warning per file


def test_all_unreadable_stops_with_a_clear_error(tmp_path):
    items = [D.VideoItem(str(tmp_path / f"{i}.mp4"), "x", f"row {i}") for i in range(3)]
    ds = D.VideoDataset(items, frames=2, stride=1, size=8)
    with pytest.raises(RuntimeError, match="consecutive videos .* are unreadable"):
        ds[0]


@pytest.mark.parametrize("missing", ["page_dir", "name", "videoid"])
def test_csv_missing_column_names_it(tmp_path, missing):
    cols = [c for c in D.CSV_COLUMNS if c != missing]
    (tmp_path / "v.csv").write_text(",".join(cols) + "\n" + ",".join("x" for _ in cols) + "\n")
    with pytest.raises(ValueError, match=f"v.csv: missing column\\(s\\) '{missing}'"):
        D.build_video_dataset(DataSection(csv=str(tmp_path / "v.csv")))


def test_csv_empty_caption_row_is_named(tmp_path, caplog):
    (tmp_path / "v.csv").write_text("videoid,name,page_dir\n1,a cat,d\n2,,d\n")
    with caplog.at_level(logging.WARNING, logger="animatediff_lite.train"):
        ds = D.build_video_dataset(DataSection(csv=str(tmp_path / "v.csv")))
    assert len(ds) == 1 and "v.csv row 3 (videoid 2): empty caption" in caplog.text
    assert ds.items[0].path == str(tmp_path / "d" / "1.mp4")
    with pytest.raises(ValueError, match="exactly one"):
        D.build_video_dataset(DataSection())


def test_resize_and_centre_crop():
    frame = np.zeros((2, 32, 64, 3), np.uint8)
    frame[:, :, :8] = (255, 0, 0)
    frame[:, :, 8:56] = (0, 255, 0)
    frame[:, :, 56:] = (0, 0, 255)
    x = D.to_clip_tensor(frame, 16)  # 32x64 -> 16x32 -> centre 16x16: all green
    assert x.shape == (3, 2, 16, 16)
    expected = torch.tensor([-1.0, 1.0, -1.0])[:, None, None, None].expand_as(x)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_latent_cache_round_trip(tmp_path):
    lat = [torch.randn(4, 3, 2, 2) for _ in range(5)]
    settings = {"frames": 3, "size": 16}
    D.SHARD, old = 2, D.SHARD  # several shards
    try:
        D.LatentDataset.write(tmp_path, lat, [f"c{i}" for i in range(5)], settings)
    finally:
        D.SHARD = old
    assert D.LatentDataset.matches(tmp_path, settings) and not D.LatentDataset.matches(tmp_path, {"frames": 4})
    ds = D.LatentDataset(tmp_path, seed=0)
    assert len(ds) == 5
    for i in range(5):
        s = ds[i]
        assert torch.equal(s["latents"], lat[i]) and s["caption"] == f"c{i}"

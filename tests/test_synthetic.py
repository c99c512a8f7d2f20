"""Procedural clips: determinism, geometry of each motion, colour, held-out splits, real video files."""

import csv

import numpy as np
import pytest

from animatediff_lite.toy import synthetic as S
from tests.toy_files import time_reversed, write_dataset


def shape_mask(video: np.ndarray, colour: str) -> np.ndarray:
    """(F, H, W) bool: pixels much closer to the named colour than the grey background is."""
    rgb = np.asarray(S.COLOURS[colour], np.float32)[None, :, None, None]
    return np.linalg.norm(video - rgb, axis=1) < 0.25


def centroids(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[0:mask.shape[1], 0:mask.shape[2]]
    area = mask.sum((1, 2))
    return np.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], 1)  # (F, 2) x, y


@pytest.mark.parametrize("frames,height,width", [(16, 64, 64), (5, 40, 56), (1, 33, 33)])
def test_shape_range_and_determinism(frames, height, width):
    spec = S.ClipSpec("triangle", "orange", "moving up")
    a = S.render_clip(spec, frames, height, width, seed=3)
    b = S.render_clip(spec, frames, height, width, seed=3)
    c = S.render_clip(spec, frames, height, width, seed=4)
    assert a.shape == (frames, 3, height, width) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert spec.caption == "an orange triangle moving up"


@pytest.mark.parametrize("shape", S.SHAPES)
@pytest.mark.parametrize("motion", list(S.DIRECTIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_directions_move_the_centroid(shape, motion, seed):
    colour = list(S.COLOURS)[seed % len(S.COLOURS)]
    video = S.render_clip(S.ClipSpec(shape, colour, motion), 16, 64, seed=seed)
    c = centroids(shape_mask(video, colour))
    delta = c[-1] - c[0]
    dx, dy = S.DIRECTIONS[motion]
    along = delta @ np.array([dx, dy])
    across = abs(delta @ np.array([dy, dx]))
    assert along > 15, (motion, delta)  # at least ~a quarter of the 64-pixel frame
    assert across < 2, (motion, delta)


@pytest.mark.parametrize("shape", S.SHAPES)
def test_growing_shrinking_rotating(shape):
    grow = shape_mask(S.render_clip(S.ClipSpec(shape, "blue", "growing"), 8, 64, seed=1), "blue").sum((1, 2))
    shrink = shape_mask(S.render_clip(S.ClipSpec(shape, "blue", "shrinking"), 8, 64, seed=1), "blue").sum((1, 2))
    assert np.all(np.diff(grow) > 0) and grow[-1] > 4 * grow[0]
    assert np.all(np.diff(shrink) < 0) and shrink[0] > 4 * shrink[-1]
    if shape != "circle":
        video = S.render_clip(S.ClipSpec(shape, "blue", "rotating"), 8, 64, seed=1)
        mask = shape_mask(video, "blue")
        area = mask.sum((1, 2))
        assert area.max() / area.min() < 1.15  # same size ...
        assert (mask[0] != mask[3]).sum() > 0.1 * area[0]  # ... different pose
        c = centroids(mask)
        assert np.abs(c - c[0]).max() < 1.5  # in place


@pytest.mark.parametrize("colour", list(S.COLOURS))
def test_dominant_saturated_colour_is_the_named_one(colour):
    video = S.render_clip(S.ClipSpec("square", colour, "moving left"), 4, 64, seed=5)
    pix = video.transpose(0, 2, 3, 1).reshape(-1, 3)
    saturated = pix[(pix.max(1) - pix.min(1)) > 0.3]  # the background is grey
    assert len(saturated) > 100
    mean = saturated.mean(0)
    nearest = min(S.COLOURS, key=lambda k: np.linalg.norm(np.asarray(S.COLOURS[k]) - mean))
    assert nearest == colour


def test_backgrounds():
    spec = S.ClipSpec("circle", "red", "growing")
    plain = S.render_clip(spec, 2, 32, seed=0, background="plain")
    grad = S.render_clip(spec, 2, 32, seed=0, background="gradient")
    assert np.unique(plain[0, 0, :2, :2]).size == 1  # corner: flat
    assert np.ptp(grad[0, :, 0, 0]) < 1e-6 and np.ptp(grad[0, 0][~shape_mask(grad, "red")[0]]) > 0.1
    with pytest.raises(ValueError, match="background"):
        S.render_clip(spec, 2, 32, background="stripes")
    with pytest.raises(ValueError, match="colour"):
        S.ClipSpec("circle", "pink", "growing")


def test_enumeration_and_held_out_split():
    specs = S.all_specs()
    assert len(specs) == len(set(specs)) == 3 * 6 * 7 - 6
    train, held = S.split_specs(n_held_out=16, seed=0)
    assert len(held) == 16 and not set(train) & set(held) and set(train) | set(held) == set(specs)
    assert all(h.motion in S.DIRECTIONS for h in held)
    assert S.split_specs(n_held_out=16, seed=0) == (train, held)
    assert S.split_specs(n_held_out=16, seed=1)[1] != held
    for h in held:  # every pair of attributes of a held-out triple was seen in training
        assert any(t.shape == h.shape and t.colour == h.colour for t in train)
        assert any(t.shape == h.shape and t.motion == h.motion for t in train)
        assert any(t.colour == h.colour and t.motion == h.motion for t in train)
    assert len({h.caption for h in held} & {t.caption for t in train}) == 0
    with pytest.raises(ValueError, match="n_held_out"):
        S.split_specs(n_held_out=200)


@pytest.mark.parametrize("fmt,tol", [("mp4", 0.02), ("gif", 0.02)])
def test_write_dataset_round_trip(tmp_path, fmt, tol):
    import imageio.v2 as imageio

    specs = S.all_specs()[:3]
    csv_path = write_dataset(tmp_path, specs, n_clips=4, frames=6, size=32, fmt=fmt)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [specs[i % 3].caption for i in range(4)]
    path = tmp_path / rows[3]["page_dir"] / f"{rows[3]['videoid']}.{fmt}"
    if fmt == "gif":
        frames = np.stack(imageio.mimread(path))
    else:
        frames = np.stack(list(imageio.get_reader(path, "FFMPEG").iter_data()))
    frames = frames[..., :3].astype(np.float32) / 255
    expected = S.render_clip(specs[0], 6, 32, seed=3).transpose(0, 2, 3, 1)
    err = np.abs(frames - expected).mean()
    print(fmt, "mean abs error after encode/decode", err)
    assert frames.shape == expected.shape and err < tol

    folder = write_dataset(tmp_path / "f", specs, frames=2, size=16, fmt=fmt, layout="folder")
    assert sorted(p.read_text().strip() for p in folder.glob("*.txt")) == sorted(s.caption for s in specs)


@pytest.mark.parametrize("motion", list(S.DIRECTIONS))
def test_time_reversed_clip_shows_the_reversed_motion(motion):
    from animatediff_lite.toy.metrics import motion_direction

    spec = S.ClipSpec("square", "green", motion)
    back = time_reversed(spec)
    assert back.motion != motion and time_reversed(back) == spec
    video = S.render_clip(spec, 8, 32, seed=2)
    assert motion_direction(video) == motion
    assert motion_direction(video[::-1].copy()) == back.motion
    assert time_reversed(S.ClipSpec("circle", "red", "growing")).motion == "shrinking"
    assert time_reversed(S.ClipSpec("square", "red", "rotating")).motion == "rotating"

"""Parity and calibration frames from a video: `segadapt export --parity-data clip.mp4` (a user with only a clip)."""

from __future__ import annotations

import numpy as np
import pytest

from segadapt.export.frames import load_frames
from segadapt.preflight import _frames_or_video
from segadapt.runtime.inputs import InputError


def test_frames_come_evenly_spaced_from_a_video(short_clip):
    import av

    with av.open(str(short_clip)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    frames = load_frames(short_clip, 3, (270, 480))  # the clip's own size: no resampling
    assert len(frames) == 3 and frames[0].shape == (270, 480, 3) and frames[0].dtype == np.uint8
    for got, i in zip(frames, (0, (len(decoded) - 1) // 2, len(decoded) - 1)):
        assert np.array_equal(got, decoded[i]), i  # first, middle and last frame, in RGB order
    assert len(load_frames(short_clip, 500, (27, 48))) == len(decoded)  # never more frames than the clip has


def test_the_export_check_takes_a_video_or_a_frame_folder_and_names_a_broken_one(short_clip, tiny, tmp_path):
    assert _frames_or_video(str(short_clip), "--parity-data", "parity frame folder") == []
    assert _frames_or_video(str(tiny / "target"), "--parity-data", "parity frame folder")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(InputError, match="broken.mp4.*--parity-data"):
        _frames_or_video(str(broken), "--parity-data", "parity frame folder")


def test_a_folder_of_webp_frames_loads_as_the_export_check_accepts_it(tmp_path):
    import cv2

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :, 0] = 200  # red in RGB
    assert cv2.imwrite(str(tmp_path / "a.webp"), rgb[:, :, ::-1], [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless
    assert len(_frames_or_video(str(tmp_path), "--parity-data", "parity frame folder")) == 1
    (frame,) = load_frames(tmp_path, 4, (20, 30))
    assert np.array_equal(frame, rgb)

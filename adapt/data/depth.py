"""Depth providers for the training-only RGB-D auxiliary stream (CrossMatch, Yin et al. ICCV 2023).

Every provider is a callable ``(image_path, image (H, W, 3) uint8 RGB) -> (depth (H, W) float32, valid (H, W) bool)``
whose depth is *normalised inverse depth* (disparity-like: near = large) in [0, 1] per image, 0 where invalid (our
design, not the paper's: see docs/method-notes.md, CrossMatch).
Normalisation divides by the image's 99th percentile of valid values (robust to a few very near pixels) and clips.

* ``files``: depth or disparity maps beside the images (same stem, ``.png``/``.npy``/``.tiff``); KITTI-style uint16
  disparity PNGs (pixels = value / 256, 0 = no measurement) are supported.
* ``stereo``: OpenCV StereoSGBM on left/right pairs; disparity -> metric depth with focal length and baseline.
* ``model``: a monocular depth model loaded with transformers' ``AutoModelForDepthEstimation`` from a local
  directory (relative depth; its output is treated as inverse depth, as DPT/Depth-Anything predict).
* ``none``: no depth (the auxiliary stream is disabled).

Adaptation runs a provider once per frame, in the main process, and stores the result
(:mod:`segadapt.adapt.data.depth_cache`); the DataLoader workers only read the stored files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np

DepthResult = Tuple[np.ndarray, np.ndarray]


def normalize_inverse_depth(inv: np.ndarray, valid: np.ndarray, percentile: float = 99.0) -> DepthResult:
    """Per-image normalisation of inverse depth to [0, 1]; invalid pixels (and non-finite or <= 0 values) -> 0.

    Args:
        inv: (H, W) inverse depth or disparity (any positive unit).
        valid: (H, W) bool.

    Returns:
        (depth (H, W) float32 in [0, 1], valid (H, W) bool).
    """
    inv = inv.astype(np.float32)
    valid = valid & np.isfinite(inv) & (inv > 0)
    out = np.zeros_like(inv, dtype=np.float32)
    if valid.any():
        scale = float(np.percentile(inv[valid], percentile))
        if scale > 0:
            out[valid] = np.clip(inv[valid] / scale, 0.0, 1.0)
    return out, valid


@dataclass
class FileDepth:
    """Depth or disparity maps stored beside the images.

    Args:
        directory: folder with one map per image, same stem (``<stem>.png``, ``.npy``, ``.tiff``, ``.exr``).
        kind: ``disparity`` (larger = nearer) or ``depth`` (metres or any unit; larger = farther).
        png_scale: divisor of integer PNG values (KITTI uses uint16 / 256 for disparity in pixels).

    Raises (on call):
        FileNotFoundError: no map for the image (the message names the expected file).
        ValueError: an unreadable map or one whose size differs from the image.
    """

    directory: str
    kind: str = "disparity"
    png_scale: float = 256.0

    def __post_init__(self) -> None:
        if self.kind not in ("disparity", "depth"):
            raise ValueError(f"kind must be 'disparity' or 'depth', got {self.kind!r}")

    def read_raw(self, image_path: Path) -> np.ndarray:
        """The stored map in its unit (disparity px or depth), 0 where not measured."""
        d = Path(self.directory)
        for suf in (".png", ".npy", ".tiff", ".tif", ".exr"):
            p = d / f"{Path(image_path).stem}{suf}"
            if p.is_file():
                break
        else:
            raise FileNotFoundError(f"{d / (Path(image_path).stem + '.png')}: no depth/disparity map for {image_path}")
        if p.suffix == ".npy":
            raw = np.load(p).astype(np.float32)
        else:
            raw = cv2.imread(str(p), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
            if raw is None:
                raise ValueError(f"{p}: cannot read depth/disparity map")
            if raw.ndim == 3:
                raw = raw[..., 0]
            raw = raw.astype(np.float32) / self.png_scale if np.issubdtype(raw.dtype, np.integer) else \
                raw.astype(np.float32)
        return raw

    def __call__(self, image_path: Path, image: np.ndarray) -> DepthResult:
        raw = self.read_raw(image_path)
        if raw.shape != image.shape[:2]:
            raise ValueError(f"{image_path}: depth map size {raw.shape} differs from the image {image.shape[:2]}")
        valid = raw > 0
        inv = raw if self.kind == "disparity" else np.where(valid, 1.0 / np.maximum(raw, 1e-6), 0.0)
        return normalize_inverse_depth(inv, valid)


@dataclass
class StereoDepth:
    """Disparity from a rectified left/right pair with OpenCV's semi-global block matching (StereoSGBM).

    Args:
        right_dir: folder of right images with the same file names as the left images.
        focal_px: focal length in pixels (KITTI: 721.5).
        baseline_m: baseline in metres (KITTI: 0.54).
        num_disparities: disparity search range in pixels (multiple of 16).
        block_size: matched block size (odd, 3-11).

    Pixels without a confident match (left-right check, uniqueness, speckle filter) are invalid, and so are the
    left margin without the full disparity search range (the first ``num_disparities - 1`` columns) and matches
    that would lie outside the right view.
    """

    right_dir: str
    focal_px: float = 721.5
    baseline_m: float = 0.54
    num_disparities: int = 128
    block_size: int = 5

    def __post_init__(self) -> None:
        if self.num_disparities % 16:
            raise ValueError(f"num_disparities must be a multiple of 16, got {self.num_disparities}")
        bs = self.block_size
        self._sgbm = cv2.StereoSGBM_create(
            minDisparity=0, numDisparities=self.num_disparities, blockSize=bs, P1=8 * 3 * bs * bs,
            P2=32 * 3 * bs * bs, disp12MaxDiff=1, uniquenessRatio=10, speckleWindowSize=100, speckleRange=2,
            preFilterCap=63, mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY)

    def disparity(self, left_rgb: np.ndarray, right_rgb: np.ndarray) -> DepthResult:
        """(disparity (H, W) float32 in pixels, valid (H, W) bool) for a rectified pair.

        Raises:
            ValueError: the two images differ in size.
        """
        if left_rgb.shape != right_rgb.shape:
            raise ValueError(f"left {left_rgb.shape} and right {right_rgb.shape} images differ in size")
        gl = cv2.cvtColor(left_rgb, cv2.COLOR_RGB2GRAY)
        gr = cv2.cvtColor(right_rgb, cv2.COLOR_RGB2GRAY)
        disp = self._sgbm.compute(gl, gr).astype(np.float32) / 16.0  # fixed point with 4 fractional bits
        # a column x can only be matched up to disparity x (the right view ends there): the first
        # num_disparities - 1 columns lack the full search range, and a match past the right view's edge is wrong
        cols = np.arange(disp.shape[1], dtype=np.float32)[None, :]
        valid = (disp > 0) & (cols >= self.num_disparities - 1) & (disp <= cols)
        return np.where(valid, disp, 0.0).astype(np.float32), valid

    def depth_m(self, disparity: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Metric depth ``f * B / d`` in metres (0 where invalid)."""
        return np.where(valid, self.focal_px * self.baseline_m / np.maximum(disparity, 1e-6), 0.0).astype(np.float32)

    def __call__(self, image_path: Path, image: np.ndarray) -> DepthResult:
        rp = Path(self.right_dir) / Path(image_path).name
        right = cv2.imread(str(rp), cv2.IMREAD_COLOR)
        if right is None:
            raise FileNotFoundError(f"{rp}: right image missing for {image_path}")
        disp, valid = self.disparity(image, cv2.cvtColor(right, cv2.COLOR_BGR2RGB))
        return normalize_inverse_depth(disp, valid)


class ModelDepth:
    """Monocular depth from a transformers ``AutoModelForDepthEstimation`` in a local directory (no download).

    Args:
        model_dir: local directory with ``config.json`` and weights.
        size: (H, W) the model runs at (multiples of 14 suit DPT/Depth-Anything backbones).
        device: torch device.

    The model's ``predicted_depth`` is treated as relative inverse depth (as DPT and Depth Anything output) and
    normalised per image; every pixel is valid.

    Raises:
        FileNotFoundError: no model directory.
    """

    def __init__(self, model_dir: str, size: Tuple[int, int] = (252, 336), device: str = "cpu"):
        import torch
        from transformers import AutoModelForDepthEstimation

        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: not a transformers model directory (no config.json)")
        self.model = AutoModelForDepthEstimation.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        self.size, self.device, self.torch = tuple(size), device, torch
        self.model_dir = str(Path(model_dir).resolve())  # part of the depth cache key (depth_cache.provider_settings)
        self.mean = np.array([0.485, 0.456, 0.406], np.float32)
        self.std = np.array([0.229, 0.224, 0.225], np.float32)

    def __call__(self, image_path: Optional[Path], image: np.ndarray) -> DepthResult:
        torch = self.torch
        h, w = image.shape[:2]
        x = cv2.resize(image, (self.size[1], self.size[0]), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        x = torch.from_numpy(((x - self.mean) / self.std).transpose(2, 0, 1))[None].to(self.device)
        with torch.no_grad():
            pred = self.model(pixel_values=x).predicted_depth  # (1, h', w')
        inv = torch.nn.functional.interpolate(pred[:, None], size=(h, w), mode="bilinear", align_corners=False)
        inv = inv[0, 0].float().cpu().numpy()
        inv = inv - inv.min() + 1e-6  # relative output: shift to positive before normalising
        return normalize_inverse_depth(inv, np.ones((h, w), bool))


def make_depth_provider(kind: str, directory: str = "", right_dir: str = "", model_dir: str = "",
                        focal_px: float = 721.5, baseline_m: float = 0.54, file_kind: str = "disparity",
                        png_scale: float = 256.0, device: str = "cpu"):
    """Build a provider from its name: ``none`` (returns None), ``files``, ``stereo`` or ``model``.

    Raises:
        ValueError: unknown kind or a required directory missing from the arguments.
    """
    if kind == "none":
        return None
    if kind == "files":
        if not directory:
            raise ValueError("--depth.provider files needs --depth.directory (the folder of depth or disparity maps)")
        return FileDepth(directory, file_kind, png_scale)
    if kind == "stereo":
        if not right_dir:
            raise ValueError("--depth.provider stereo needs --depth.right-dir (right images named like the left "
                             "images)")
        return StereoDepth(right_dir, focal_px, baseline_m)
    if kind == "model":
        if not model_dir:
            raise ValueError("--depth.provider model needs --depth.model-dir (a local transformers directory)")
        return ModelDepth(model_dir, device=device)
    raise ValueError(f"unknown depth provider {kind!r}; choose none, files, stereo or model")

"""Video for the shard writers: N uniformly sampled frames decoded with PyAV (FFmpeg), and
per-video feature files (VALUE-style pre-extracted CLIP frame features).

    frames = decode_frames("clip.mp4", num_frames=32, size=224)            # (32, 224, 224, 3)
    frames = decode_frames(data, 8, 96, start=12.5, end=20.0)               # bytes, a window

Sampling: the window [start, end] (default: the whole video) is cut into N equal segments and
each segment's centre takes the frame shown at that time (the last frame starting at or
before it), so a short clip repeats frames and a long one skips them, with one sequential
decode that stops after the last needed frame. Frames are resized (shorter side -> size,
bicubic, in FFmpeg's scaler) and centre-cropped to size x size, as the image path's
data.image_resize=crop (the reference reads the VALUE release's precomputed frame features and
resizes no frames itself).
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
FEATURE_EXTS = (".npy", ".npz")


class VideoError(ValueError):
    """A video that cannot be opened or decoded."""


def require_av():
    """PyAV, an optional dependency (the `video` extra); vlds.cli.MissingExtra (an ImportError,
    never a VideoError: a missing decoder is not a bad video) naming the install command."""
    from vlds.cli import require

    return require("av", "video", "decoding videos (the video shard writers)")


def sample_times(num_frames: int, start: float, end: float) -> list[float]:
    """Centres of num_frames equal segments of [start, end]."""
    step = (end - start) / num_frames
    return [start + (i + 0.5) * step for i in range(num_frames)]


def _rgb(frame, size: int) -> np.ndarray:
    """A decoded frame -> (size, size, 3) uint8: shorter side to size, centre crop."""
    w, h = frame.width, frame.height
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    arr = frame.to_ndarray(format="rgb24", width=rw, height=rh, interpolation="BICUBIC")
    left, top = (rw - size) // 2, (rh - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def decode_frames(
    src: str | Path | bytes,
    num_frames: int,
    size: int,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 frames sampled uniformly from a video file or its
    bytes; raises VideoError for anything FFmpeg cannot open or decode."""
    av = require_av()

    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    f = io.BytesIO(src) if isinstance(src, bytes) else str(src)
    try:
        with av.open(f) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            offset = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
            duration = _duration(container, stream)
            lo = max(0.0, start or 0.0)
            hi = end if end is not None else duration
            if hi is None or hi <= lo:
                return _by_index(container.decode(stream), num_frames, size)
            targets = sample_times(num_frames, lo, hi)
            out: list[np.ndarray | None] = [None] * num_frames
            j, prev, prev_rgb = 0, None, None
            for frame in container.decode(stream):
                t = (frame.time if frame.time is not None else 0.0) - offset
                while j < num_frames and t > targets[j]:
                    chosen = prev if prev is not None else frame
                    if prev_rgb is None or chosen is not prev:
                        prev_rgb = _rgb(chosen, size)
                    out[j] = prev_rgb
                    j += 1
                if j == num_frames:
                    break
                prev, prev_rgb = frame, None
            if prev is None and j == 0:
                raise VideoError("no frame could be decoded")
            last = None
            for k in range(j, num_frames):  # targets after the last frame: the last frame
                last = last if last is not None else _rgb(prev, size)
                out[k] = last
            return np.stack(out)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        raise VideoError(f"undecodable video: {e}") from None


def _by_index(frames, num_frames: int, size: int) -> np.ndarray:
    """No usable duration: decode everything small, pick uniformly by frame index."""
    decoded = [_rgb(fr, size) for fr in frames]
    if not decoded:
        raise VideoError("no frame could be decoded")
    n = len(decoded)
    return np.stack(
        [decoded[min(n - 1, int((i + 0.5) * n / num_frames))] for i in range(num_frames)]
    )


def encode_video(path: str | Path, frames: np.ndarray, fps: int = 10, codec: str = "mpeg4"):
    """Write (T, H, W, 3) uint8 frames as a video file (tests and benchmarks make clips)."""
    av = require_av()

    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def load_feature_file(data: bytes, name: str) -> np.ndarray:
    """A per-video feature file (.npy (T, D), or .npz with one array or a "features" /
    "feats" entry) -> (T, D) float16. Never unpickles."""
    try:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(arrays, np.lib.npyio.NpzFile):
            keys = list(arrays.keys())
            key = next((k for k in ("features", "feats") if k in keys), keys[0] if keys else None)
            if key is None or (len(keys) > 1 and key not in ("features", "feats")):
                raise ValueError(f"{name}: npz with arrays {keys}; expected one or 'features'")
            arr = arrays[key]
        else:
            arr = arrays
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise VideoError(f"unreadable feature file {name}: {e}") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 2 or arr.shape[0] == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise VideoError(f"feature file {name} holds {arr.dtype} {arr.shape}, not (T, D) floats")
    return arr.astype(np.float16)

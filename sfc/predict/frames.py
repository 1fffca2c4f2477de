"""Frames to predict: a folder of images (name order) or a video file (OpenCV). Every problem
is a `DatasetError` naming the file and what was expected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from sfc.data.io import DatasetError, read_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class FrameFolder:
    """The image files of `folder` in name order; all must have one size."""

    def __init__(self, folder, limit: int | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetError(f"--frames {self.folder}: not a folder")
        self.files = sorted(p for p in self.folder.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DatasetError(f"--frames {self.folder}: no image files "
                               f"({', '.join(IMAGE_SUFFIXES)}) in it")
        self.files = self.files[:limit] if limit else self.files
        self.size = self._common_size()
        self.fps = None

    def _common_size(self) -> tuple[int, int]:
        first = None
        for p in self.files:
            try:
                with Image.open(p) as im:  # the header only
                    size = im.size
            except (OSError, SyntaxError, ValueError) as e:
                raise DatasetError(f"unreadable image {p}: {e}") from None
            if first is None:
                first = (p, size)
            elif size != first[1]:
                raise DatasetError(f"--frames {self.folder}: frames of different sizes — "
                                   f"{first[0].name} is {first[1][0]}x{first[1][1]}, {p.name} "
                                   f"is {size[0]}x{size[1]}; expected one video's frames")
        return first[1]

    def __len__(self) -> int:
        return len(self.files)

    def names(self) -> list[str]:
        return [p.stem for p in self.files]

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for p in self.files:
            yield p.stem, read_rgb(p)  # (H, W, 3) uint8 RGB at the file's size


class VideoFile:
    """The frames of a video file (any format OpenCV's FFmpeg reads)."""

    def __init__(self, path, limit: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(f"--video {self.path}: no such file")
        if self.path.suffix.lower() in IMAGE_SUFFIXES:
            raise DatasetError(f"--video {self.path}: an image file, not a video; pass the "
                               "folder of a video's frames with --frames")
        cap = cv2.VideoCapture(str(self.path))
        ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok or frame is None:
            cap.release()
            raise DatasetError(f"--video {self.path}: cannot be read as a video (OpenCV "
                               "decodes no frame from it)")
        self.fps = cap.get(cv2.CAP_PROP_FPS) or None
        count = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0)  # -1: unknown
        cap.release()
        self.size = (frame.shape[1], frame.shape[0])
        self.limit = limit
        self.count = min(count, limit) if limit and count > 0 else count

    def __len__(self) -> int:
        return self.count

    def names(self) -> list[str]:
        """The frame names, as far as the container tells the frame count (else none)."""
        return [f"frame_{i:06d}" for i in range(self.count)]

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        cap = cv2.VideoCapture(str(self.path))
        i = 0
        try:
            while self.limit is None or i < self.limit:
                ok, frame = cap.read()
                if not ok:
                    break
                if (frame.shape[1], frame.shape[0]) != self.size:
                    raise DatasetError(f"--video {self.path}: frame {i} is "
                                       f"{frame.shape[1]}x{frame.shape[0]}, the first "
                                       f"{self.size[0]}x{self.size[1]}")
                yield f"frame_{i:06d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                i += 1
        finally:
            cap.release()

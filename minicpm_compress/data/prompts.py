"""Image + text prompts for MiniCPM-V models: token rows with image slots, and the positions that are scored.

Each row is one image's placeholder block followed by text, `length` tokens in all:

    <image> <unk>×64 </image> [<slice> <unk>×64 </slice> … \\n …] \\n text…

(MiniCPM-V 2.6's layout, which llama.cpp's mtmd also builds; with `use_image_id` the block starts with
`<image_id>i</image_id>`). The `<unk>` positions are slots: the vision half's output rows replace their
embeddings at the LLM's first layer. Only predictions of the text after the image are scored; the rows
are the evaluation (or calibration) windows of the text-only path with the image block in front, so a
VLM is measured on the same held-out text as the LLM alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import CompressError
from .images import ImagePieces, preprocess

if TYPE_CHECKING:
    from ..models.minicpmv import VLMSettings


@dataclass
class ImagePrompts:
    ids: torch.Tensor  # [rows, length] token ids (slots hold the placeholder id)
    slots: torch.Tensor  # [rows, length] bool: positions that take image features
    scored: torch.Tensor  # [rows, length - 1] bool: positions whose next-token prediction is scored
    images: list[ImagePieces]  # per row, the preprocessed image (rows share objects when images repeat)
    names: list[str]  # per row, the image's name
    rgb: list[np.ndarray]  # per row, the original uint8 image (for runtimes that preprocess themselves)
    features: list[torch.Tensor] | None = None  # per row, [slots in row, width] from some vision half

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def __len__(self) -> int:
        return self.ids.shape[0]

    def numel(self) -> int:
        return self.ids.numel()

    def __getitem__(self, sl: slice) -> "ImagePrompts":
        return ImagePrompts(self.ids[sl], self.slots[sl], self.scored[sl], self.images[sl], self.names[sl],
                            self.rgb[sl], self.features[sl] if self.features is not None else None)

    def split(self, batch_size: int) -> list["ImagePrompts"]:
        return [self[i : i + batch_size] for i in range(0, len(self), batch_size)]

    def to(self, device) -> "ImagePrompts":
        return replace(self, ids=self.ids.to(device))

    def with_features(self, features: list[torch.Tensor]) -> "ImagePrompts":
        return replace(self, features=features)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.ids, self.slots, self.scored):
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        for image in {id(i): i for i in self.images}.values():
            for piece in image.pieces:
                h.update(piece.contiguous().numpy().tobytes())
        return h.hexdigest()


def token_ids(windows) -> torch.Tensor:
    return windows.ids if isinstance(windows, ImagePrompts) else windows


def scored_mask(windows) -> torch.Tensor:
    """[rows, length - 1] bool of scored positions (all of them for plain text windows)."""
    if isinstance(windows, ImagePrompts):
        return windows.scored
    return torch.ones(windows.shape[0], windows.shape[1] - 1, dtype=torch.bool)


def _special(tokenizer, text: str) -> int:
    i = tokenizer.convert_tokens_to_ids(text)
    if i is None or (tokenizer.unk_token_id is not None and i == tokenizer.unk_token_id and text != tokenizer.unk_token):
        raise CompressError(f"the tokenizer has no '{text}' token (MiniCPM-V image layouts need it)")
    return i


def image_id_text(settings: "VLMSettings", index: int = 0) -> str:
    """The text before image `index`'s block when the model numbers its images (MiniCPM-V 2.6 on): llama.cpp's
    mtmd does not write it, so an app (and our llama.cpp runner) sends it in front of the image marker."""
    return f"<image_id>{index}</image_id>" if settings.use_image_id else ""


def image_block(tokenizer, settings: "VLMSettings", image: ImagePieces, index: int) -> tuple[list[int], list[bool]]:
    """Token ids and slot flags of one image's placeholder block, newline after it included."""
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    slots: list[bool] = []

    def text(t: list[int]):
        ids.extend(t)
        slots.extend([False] * len(t))

    def piece(start: str, end: str):
        text([_special(tokenizer, start)])
        ids.extend([unk] * settings.query_num)
        slots.extend([True] * settings.query_num)
        text([_special(tokenizer, end)])

    if settings.use_image_id:
        text([_special(tokenizer, "<image_id>")] + tokenizer(str(index), add_special_tokens=False)["input_ids"]
             + [_special(tokenizer, "</image_id>")])
    piece("<image>", "</image>")
    if image.grid:
        cols, rows = image.grid
        for r in range(rows):
            for _ in range(cols):
                piece("<slice>", "</slice>")
            if r != rows - 1:
                text(newline)
    text(newline)
    return ids, slots


def image_prompts(tokenizer, settings: "VLMSettings", images: list[tuple[str, np.ndarray]],
                  windows: torch.Tensor) -> ImagePrompts:
    """Rows of `windows` (text token ids), each preceded by an image's block (images cycled in order) and cut
    back to the window length."""
    length = windows.shape[1]
    pre = [preprocess(a, settings.scale_resolution, settings.patch_size, settings.max_slice_nums, settings.slice_mode)
           for _, a in images]
    ids, slots, scored, rows_images, names, rgb = [], [], [], [], [], []
    for r in range(windows.shape[0]):
        k = r % len(images)
        block, flags = image_block(tokenizer, settings, pre[k], 0)
        if len(block) + 2 > length:
            raise CompressError(f"image '{images[k][0]}' takes {len(block)} tokens, more than the window of "
                                f"{length}; use a longer window or fewer slices")
        ids.append(block + windows[r, : length - len(block)].tolist())
        slots.append(flags + [False] * (length - len(block)))
        scored.append([p >= len(block) - 1 for p in range(length - 1)])
        rows_images.append(pre[k])
        names.append(images[k][0])
        rgb.append(images[k][1])
    return ImagePrompts(torch.tensor(ids, dtype=torch.long), torch.tensor(slots), torch.tensor(scored),
                        rows_images, names, rgb)

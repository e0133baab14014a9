"""CLIP image-caption similarity, the score web-pair curation filters on (LAION's `similarity`).

`ClipScorer` loads a Hugging Face CLIP folder (a full `CLIPModel`: vision and text towers, their
projections, the tokenizer and the image processor, as `save_pretrained` writes them, e.g.
openai/clip-vit-large-patch14) and scores batches of (image bytes, caption): the cosine of the
projected image and text embeddings, in [-1, 1], without CLIP's logit scale. The filter step runs
it on Ray Data actors (`pipelines/steps/_filter_clip.py`); `keep_top_fraction` turns a target share
into a drop set that does not depend on the order in which scores arrived.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image


def check_clip_folder(folder: str | Path, field: str) -> None:
    """ValueError naming `field` unless `folder` holds a full CLIP model (both towers): a
    CLIPVisionModel folder (enough for the init step) cannot score captions."""
    path = Path(folder).expanduser()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{field}: {folder}: not a Hugging Face CLIP folder ({exc})") from exc
    if "text_config" not in config or "vision_config" not in config:
        raise ValueError(
            f"{field}: {folder}: a CLIP vision model without its text tower; the CLIP score needs "
            "a full CLIPModel folder (e.g. openai/clip-vit-large-patch14 as downloaded)"
        )


class ClipScorer:
    """A CLIP folder, loaded once; `scores(images, captions)` for one batch."""

    def __init__(self, folder: str | Path, device: str = "cpu") -> None:
        import torch
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        check_clip_folder(folder, "clip_model")
        folder = Path(folder).expanduser()
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.processor = CLIPImageProcessor.from_pretrained(folder)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def scores(self, images: list[bytes], captions: list[str]) -> np.ndarray:
        """(N,) float32 cosine similarities of each image with its caption. Captions are padded to
        CLIP's full context, so a sample's score does not depend on the rest of its batch's text."""
        import torch

        assert len(images) == len(captions)
        if not images:
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            return self._scores(images, captions)

    def _scores(self, images: list[bytes], captions: list[str]) -> np.ndarray:
        pixels = self.processor(
            images=[_rgb(data) for data in images], return_tensors="pt"
        ).pixel_values.to(self.device)  # (N, 3, H, W)
        text = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)  # fmt: skip
        out = self.model(pixel_values=pixels, input_ids=text.input_ids,
                         attention_mask=text.attention_mask)  # fmt: skip
        # image_embeds / text_embeds come out L2-normalised: their dot product is the cosine.
        return (out.image_embeds * out.text_embeds).sum(-1).float().cpu().numpy()  # (N,)


def _rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def keep_top_fraction(keys: list[str], scores: np.ndarray, fraction: float) -> set[str]:
    """Keys to drop so that the ceil(`fraction` * N) best-scoring samples stay. Ties are broken
    by key (smaller kept first), so the result depends only on the (key, score) pairs."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep_top_fraction={fraction}: must be in (0, 1]")
    num_keep = math.ceil(fraction * len(keys))
    # lexsort: last key is primary -> score descending, then key ascending.
    order = np.lexsort((np.asarray(keys, dtype=object).astype(str), -np.asarray(scores)))
    return {keys[i] for i in order[num_keep:]}

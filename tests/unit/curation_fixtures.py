"""Images with distinct perceptual hashes, and CLIP scores computed the plain transformers way:
the known answers of the curation rules' tests (unit and integration)."""

import io

import numpy as np
import torch
from PIL import Image


def pattern_png(seed: int, size: int = 64) -> bytes:
    """A random 8x8 block pattern scaled to `size` px: images with distinct perceptual hashes."""
    blocks = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blocks).resize((size, size), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def reference_scores(folder, images: list[bytes], captions: list[str]) -> np.ndarray:
    """Cosine of CLIP image and text features, one sample at a time, unpadded text."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer, processor = (
        CLIPTokenizer.from_pretrained(folder),
        CLIPImageProcessor.from_pretrained(folder),
    )
    out = []
    with torch.no_grad():
        for data, caption in zip(images, captions):
            pixels = processor(
                images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt"
            )
            image = model.get_image_features(pixel_values=pixels.pixel_values).pooler_output
            text = model.get_text_features(
                **tokenizer([caption], return_tensors="pt")
            ).pooler_output
            out.append(torch.nn.functional.cosine_similarity(image, text).item())
    return np.array(out)

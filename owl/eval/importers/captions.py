"""Importers of caption benchmarks: COCO (Karpathy split), Flickr30k, NoCaps; scored by the COCO
caption toolkit (owl.eval.caption_metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from owl.eval.importers.official import Record, _field, _find_image, _Inputs


def _captions(inputs: _Inputs, split: str = "test") -> list[Record]:
    """Karpathy's dataset_{coco,flickr30k}.json (the `split` images) or a COCO-format caption
    file ({"images": [{id, file_name}], "annotations": [{image_id, caption}]}, e.g. NoCaps)."""
    path, data, folder = inputs.json_and_images("caption annotation JSON")
    images = _field(data, "images", str(path))
    records = []
    if "annotations" in data:  # COCO format
        references: dict[Any, list[str]] = {}
        for n, ann in enumerate(data["annotations"]):
            where = f"{path}: annotations[{n}]"
            references.setdefault(_field(ann, "image_id", where), []).append(
                str(_field(ann, "caption", where))
            )
        for n, image in enumerate(images):
            where = f"{path}: images[{n}]"
            image_id = _field(image, "id", where)
            file_name = str(image.get("file_name") or _field(image, "image", where))
            records.append(_caption_record(image_id, _find_image(folder, file_name, where),
                                           references.get(image_id, []), where))  # fmt: skip
        return records
    for n, image in enumerate(images):  # Karpathy format
        where = f"{path}: images[{n}]"
        if _field(image, "split", where) != split:
            continue
        file_name = str(_field(image, "filename", where))
        sub = str(image.get("filepath", ""))
        image_id = image.get("cocoid", Path(file_name).stem)
        refs = [str(_field(s, "raw", where)) for s in _field(image, "sentences", where)]
        found = _find_image(folder, file_name, where, (sub,) if sub else ())
        records.append(_caption_record(image_id, found, refs, where))
    if not records:
        raise ValueError(f"{path}: no image with split {split!r}")
    return records


def _caption_record(image_id: Any, image: str, references: list[str], where: str) -> Record:
    if not references:
        raise ValueError(f"{where}: image {image_id} has no reference caption")
    return {"id": str(image_id), "type": "caption", "image_id": image_id, "images": [image],
            "references": references, "prompt": "coco_caption"}  # fmt: skip


def import_coco_karpathy(inputs: _Inputs) -> list[Record]:
    return _captions(inputs)


def import_flickr30k(inputs: _Inputs) -> list[Record]:
    return _captions(inputs)


def import_nocaps(inputs: _Inputs) -> list[Record]:
    return _captions(inputs)

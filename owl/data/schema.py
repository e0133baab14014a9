"""The versioned Arrow schema of tokenized training shards (the tokenize step writes them, the
training loader reads them).

One row is one sample, ready for the model:
- `input_ids`: token ids with every image placeholder already expanded to
  `OwlConfig.num_visual_tokens` copies of `owl.IMAGE_TOKEN_ID`, so the length is the final length;
- `labels`: same length, `owl.IGNORE_INDEX` where no loss is taken (prompt, user turns, images);
- `images`: the encoded image files (JPEG/PNG bytes) in the order their placeholders appear;
  pixels are produced at load time by `owl.data.image.preprocess_images`.
Modality ids are not stored: they are `input_ids == IMAGE_TOKEN_ID`.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

SAMPLE_KINDS = ("caption", "multimodal", "text")

TOKENIZED_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # one of SAMPLE_KINDS
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("num_supervised", pa.int32(), nullable=False),
        # Where the sample came from, for lineage: URL, file + line, or shard + key.
        pa.field("source", pa.string(), nullable=False),
    ],
    metadata={"owl.schema": "tokenized", "owl.schema_version": SCHEMA_VERSION},
)


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise ValueError naming `where` when a shard's schema is not the tokenized schema we read."""
    meta = schema.metadata or {}
    version = meta.get(b"owl.schema_version", b"?").decode()
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{where}: tokenized schema version {version!r}, this code reads {SCHEMA_VERSION!r}; "
            "re-run the tokenize step with this version of owl"
        )
    missing = [f.name for f in TOKENIZED_SCHEMA if f.name not in schema.names]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}")

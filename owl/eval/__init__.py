"""Evaluation: benchmark files, the authors' prompts, batched generation and standard scoring.

- `benchmarks`: read and validate benchmark files (JSONL or parquet, one record per item);
- `prompts`: the prompt the authors used for each benchmark type, as a conversation;
- `generate`: batched greedy generation over records (`predict`) and scoring (`score`);
- `metrics`: VQAv2 accuracy, COCO caption metrics, multiple choice (circular), yes/no, text;
- `importers`: official benchmark files -> benchmark files (`KINDS`);
- `evaluate`: one evaluation (read, predict through a given predictor, score, write), the path
  `owl eval` and the evaluate step share, with their options declared once (`EvalOptions`).
"""

"""How sure a headline metric is: per-item scores, bootstrap intervals and paired comparisons.

Each benchmark type has one headline metric, written as a weighted sum of per-stratum means of
per-unit values, so that it equals what `owl.eval.scoring.score` reports:

- vqa, text, yes_no (default and POPE): `accuracy`, a unit per record;
- multiple_choice: `circular_accuracy` (a unit per question, 1 if every rotation asked is right)
  when questions were asked under several rotations, else `accuracy` (the original order);
- MME (rule `mme`): `perception` (else `cognition` when no perception subtask is present), a unit
  per image, a stratum per subtask: value = right answers x images / questions + both right,
  whose subtask mean is acc + acc_plus; weight 100 (MME's score);
- caption: `CIDEr` (`CIDEr_approx`), a unit per image: its CIDEr-D with the corpus's document
  frequencies (their mean is the corpus CIDEr).

Intervals are percentile bootstraps over units (resampled within strata), paired comparisons
resample the units both runs scored; a fixed seed makes both reproducible to the last digit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from owl.eval.benchmarks import BenchmarkRecord, is_unanswered
from owl.eval.caption_metrics import APPROX_SUFFIX, cider_per_image
from owl.eval.metrics import MME_PERCEPTION, parse_yes_no_mme
from owl.eval.scoring import choice_result, sample_score

NUM_RESAMPLES = 1000
LEVEL = 0.95
_DRAWS_PER_CHUNK = 4_000_000  # random indices drawn at once (memory: 8 bytes each)


@dataclass(frozen=True)
class Units:
    """A headline metric as per-unit values: metric = sum_s weights[s] * mean(values in s)."""

    metric: str
    ids: tuple[str, ...]
    strata: tuple[str, ...]
    values: np.ndarray  # (N,) float64
    weights: Mapping[str, float] = field(default_factory=lambda: {"": 1.0})

    def estimate(self) -> float:
        return float(sum(w * self.stratum(s).mean() for s, w in self.weights.items()))

    def stratum(self, stratum: str) -> np.ndarray:
        return self.values[[i for i, s in enumerate(self.strata) if s == stratum]]

    def rows(self, record_type: str) -> list[dict[str, Any]]:
        """One row per unit, as the step writes them (`units/<benchmark>.parquet`)."""
        return [
            {"type": record_type, "metric": self.metric, "unit": u, "stratum": s,
             "weight": float(self.weights[s]), "value": float(v)}
            for u, s, v in zip(self.ids, self.strata, self.values)
        ]  # fmt: skip


def write_units(path: Path, units: Mapping[str, Units]) -> int:
    """The units of a benchmark's record types as one parquet file (`Units.rows` per row);
    returns the number of rows (0: nothing scored, no file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [row for record_type, u in units.items() for row in u.rows(record_type)]
    if rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
    return len(rows)


def units_from_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Units]:
    """The inverse of `Units.rows`, per record type."""
    by_type: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_type[str(row["type"])].append(row)
    return {
        record_type: Units(
            metric=str(rs[0]["metric"]),
            ids=tuple(str(r["unit"]) for r in rs),
            strata=tuple(str(r["stratum"]) for r in rs),
            values=np.array([float(r["value"]) for r in rs]),
            weights={str(r["stratum"]): float(r["weight"]) for r in rs},
        )
        for record_type, rs in by_type.items()
    }


def _resampled(
    strata: Sequence[tuple[float, np.ndarray]], num_resamples: int, seed: int
) -> np.ndarray:
    """(num_resamples,) estimates, each unit of each stratum drawn with replacement."""
    rng = np.random.default_rng(seed)
    totals = np.zeros(num_resamples)
    for weight, values in strata:
        n = len(values)
        step = max(1, _DRAWS_PER_CHUNK // n)
        for start in range(0, num_resamples, step):
            count = min(step, num_resamples - start)
            draws = rng.integers(0, n, size=(count, n))
            totals[start : start + count] += weight * values[draws].mean(axis=1)
    return totals


def interval(
    units: Units, level: float = LEVEL, num_resamples: int = NUM_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the headline metric."""
    strata = [(w, units.stratum(s)) for s, w in units.weights.items()]
    estimates = _resampled(strata, num_resamples, seed)
    low, high = np.quantile(estimates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_difference(
    a: Units, b: Units, level: float = LEVEL, num_resamples: int = NUM_RESAMPLES, seed: int = 0
) -> dict[str, float]:
    """A - B over the units both scored: A's and B's metric on them, the difference, its paired percentile bootstrap
    interval and a two-sided bootstrap p-value (the resampled differences centred on the
    observed one, as under "no difference": the share at least as far from it, +1 smoothed)."""
    if a.metric != b.metric:
        raise ValueError(f"cannot compare {a.metric!r} with {b.metric!r}: different metrics")
    b_index = {u: i for i, u in enumerate(b.ids)}
    common = [(i, b_index[u]) for i, u in enumerate(a.ids) if u in b_index]
    if not common:
        raise ValueError("the two runs scored no unit in common (different benchmark files?)")
    mine = np.array([a.values[i] for i, _ in common])
    theirs = np.array([b.values[j] for _, j in common])
    diff = mine - theirs
    strata = [a.strata[i] for i, _ in common]
    if any(b.strata[j] != a.strata[i] for i, j in common):
        raise ValueError("the same unit falls in different strata in the two runs")
    paired = Units(a.metric, tuple(a.ids[i] for i, _ in common), tuple(strata), diff, a.weights)
    present = {s: w for s, w in a.weights.items() if s in set(strata)}
    ids = paired.ids
    observed = Units(a.metric, ids, paired.strata, diff, present).estimate()
    estimates = _resampled([(w, paired.stratum(s)) for s, w in present.items()],
                           num_resamples, seed)  # fmt: skip
    low, high = np.quantile(estimates, [(1 - level) / 2, (1 + level) / 2])
    extreme = int(np.sum(np.abs(estimates - observed) >= abs(observed) - 1e-12))
    return {
        "a": Units(a.metric, ids, paired.strata, mine, present).estimate(),
        "b": Units(a.metric, ids, paired.strata, theirs, present).estimate(),
        "difference": observed,
        "low": float(low),
        "high": float(high),
        "p_value": (1 + extreme) / (1 + num_resamples),
        "count": float(len(common)),
    }


def headline_units(
    records: Sequence[BenchmarkRecord],
    predictions: Sequence[Mapping[str, Any]],
    *,
    vqa_rule: str = "vqav2",
    caption_tokenizer: str = "ptb",
) -> dict[str, Units]:
    """Per record type with public answers: the headline metric as units (module docstring)."""
    by_id = {r.id: r for r in records}
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for prediction in predictions:
        record = by_id[prediction["id"]]
        if not is_unanswered(record):
            grouped[record.type].append(prediction)
    units = {}
    for record_type, preds in grouped.items():
        pairs = [(by_id[p["id"]], p) for p in preds]
        if record_type == "caption":
            units[record_type] = _caption_units(pairs, caption_tokenizer)
        elif record_type == "multiple_choice":
            units[record_type] = _choice_units(pairs)
        elif record_type == "yes_no" and pairs[0][0].rule == "mme":
            units[record_type] = _mme_units(pairs)
        else:
            values = np.array([sample_score(r, p, vqa_rule) for r, p in pairs])
            units[record_type] = Units("accuracy", tuple(r.id for r, _ in pairs),
                                       ("",) * len(pairs), values)  # fmt: skip
    return units


def _caption_units(
    pairs: Sequence[tuple[BenchmarkRecord, Mapping[str, Any]]], tokenizer: str
) -> Units:
    references = {r.id: list(r.references) for r, _ in pairs}
    per_image = cider_per_image(references, {r.id: p["prediction"] for r, p in pairs}, tokenizer)
    metric = "CIDEr" + (APPROX_SUFFIX if tokenizer == "approx" else "")
    ids = tuple(per_image)
    return Units(metric, ids, ("",) * len(ids), np.array([per_image[i] for i in ids]))


def _choice_units(pairs: Sequence[tuple[BenchmarkRecord, Mapping[str, Any]]]) -> Units:
    asked: dict[str, list[bool]] = defaultdict(list)
    original: dict[str, bool] = {}
    for record, prediction in pairs:
        result = choice_result(record, prediction)
        right = result.predicted == result.answer
        asked[result.question_id].append(right)
        if result.shift == 0:
            original[result.question_id] = right
    circular = any(len(rights) > 1 for rights in asked.values())
    ids = tuple(asked)
    values = [all(asked[q]) if circular else original[q] for q in ids]
    metric = "circular_accuracy" if circular else "accuracy"
    return Units(metric, ids, ("",) * len(ids), np.array(values, dtype=float))


def _mme_units(pairs: Sequence[tuple[BenchmarkRecord, Mapping[str, Any]]]) -> Units:
    per_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for record, prediction in pairs:
        category = str(record.extra["category"])
        per_image[(category, record.pair_id)].append(
            parse_yes_no_mme(prediction["prediction"]) == record.answer
        )
    perception = any(c in MME_PERCEPTION for c, _ in per_image)
    chosen = {k: v for k, v in per_image.items() if (k[0] in MME_PERCEPTION) == perception}
    num_questions: dict[str, int] = defaultdict(int)
    num_images: dict[str, int] = defaultdict(int)
    for (category, _), rights in chosen.items():
        num_questions[category] += len(rights)
        num_images[category] += 1
    keys = tuple(chosen)
    values = np.array([sum(chosen[k]) * num_images[k[0]] / num_questions[k[0]] + all(chosen[k])
                       for k in keys])  # fmt: skip
    return Units("perception" if perception else "cognition",
                 tuple(f"{c}/{image}" for c, image in keys), tuple(c for c, _ in keys), values,
                 {c: 100.0 for c in num_images})  # fmt: skip


CI_LOW, CI_HIGH = "_ci95_low", "_ci95_high"  # suffixes of a metric's interval bounds


def intervals(units: Mapping[str, Units]) -> dict[str, float]:
    """ "<type>.<metric>_ci95_low" / "_ci95_high" per type, beside score()'s "<type>.<metric>"."""
    out = {}
    for record_type, u in units.items():
        low, high = interval(u)
        out[f"{record_type}.{u.metric}{CI_LOW}"] = low
        out[f"{record_type}.{u.metric}{CI_HIGH}"] = high
    return out


def with_intervals(
    metrics: Mapping[str, float],
) -> list[tuple[str, float, tuple[float, float] | None]]:
    """(name, value, its 95% interval or None) per metric, names sorted; the interval bounds are
    not listed on their own (`owl status` and the model card show them beside their metric)."""
    rows = []
    for name, value in sorted(metrics.items()):
        if name.endswith((CI_LOW, CI_HIGH)):
            continue
        bounds = metrics.get(name + CI_LOW), metrics.get(name + CI_HIGH)
        rows.append((name, value, None if None in bounds else bounds))
    return rows

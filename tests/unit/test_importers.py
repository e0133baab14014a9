"""Importers from each benchmark's official files (tiny ones, written in the owners' schema by
the tests), the submission files for splits without answers, and docs/benchmarks.md's commands
run as written."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from eval_helpers import make_model, make_tokenizer
from official_files import _json, every_kind, write_all, write_mmbench, write_vqav2

from owl.eval.benchmarks import read_benchmark
from owl.eval.caption_metrics import java_available
from owl.eval.importers import import_benchmark, parse_spec
from owl.eval.submissions import submission_format, write_submission
from pipelines.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def _documented_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("owl ")]


def test_documented_commands_run_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    write_all(tmp_path)
    # Where a demo run leaves stage 2 (the docs' `<key>`: the step's cache key, here a made-up one).
    key = "0123456789abcdef"
    make_model(tmp_path / f"runs/demo/steps/stage2/{key}/model", make_tokenizer(tmp_path / "tok"))
    monkeypatch.chdir(tmp_path)
    commands = _documented_commands()
    assert len(commands) >= 6
    printed = {}
    for command in commands:
        capsys.readouterr()
        assert main(shlex.split(command.replace("<key>", key))[1:]) == 0, command
        printed[shlex.split(command)[1]] = capsys.readouterr().out  # the last of each command
    vqa = json.loads(printed["eval"])["metrics"]["vqav2"]
    assert vqa["vqa.count"] == 2.0 and 0.0 <= vqa["vqa.accuracy"] <= 1.0
    assert vqa["vqa.accuracy_ci95_low"] <= vqa["vqa.accuracy"] <= vqa["vqa.accuracy_ci95_high"]
    [itself] = json.loads(printed["compare"])["comparisons"]  # a model against itself
    assert (itself["benchmark"], itself["difference"], itself["p_value"]) == ("vqav2", 0.0, 1.0)

    vqav2 = read_benchmark("benchmarks/vqav2.jsonl")
    assert [r.id for r in vqav2] == ["42000", "73001"]  # official question ids
    assert vqav2[0].extra["question_id"] == 42000 and vqav2[0].rule == "vqav2"
    assert vqav2[1].answers == ("2",) * 6 + ("two",) * 4
    assert vqav2[0].extra["answer_type"] == "other"
    assert Path(vqav2[0].images[0]).name == "COCO_val2014_000000000042.jpg"
    testdev = read_benchmark("benchmarks/vqav2_testdev.jsonl")
    assert testdev[0].answers == () and submission_format(testdev) == "vqav2"
    assert Path(testdev[0].images[0]).parent.name == "test2015"

    mmbench = read_benchmark("benchmarks/mmbench_dev.jsonl")
    assert [r.id for r in mmbench] == ["0", "1", "1000001"]
    assert mmbench[0].options == ("red", "green") and mmbench[0].hint == ""  # "nan" hint
    assert mmbench[1].hint == "A drawing." and mmbench[1].prompt == "mmbench"
    assert [r.group for r in mmbench] == ["0", "1", "1"]  # copies grouped with their question
    assert mmbench[2].extra["circular_shift"] == 1 and mmbench[2].rule == "single"
    assert Path(mmbench[2].images[0]).read_bytes() == Path(mmbench[1].images[0]).read_bytes()

    mme = read_benchmark("benchmarks/mme.jsonl")
    assert {r.extra["category"] for r in mme} == {"existence", "artwork"}
    assert [r.answer for r in mme] == ["yes", "no", "yes", "no"]
    assert len({r.pair_id for r in mme}) == 2 and mme[0].rule == "mme"

    pope = read_benchmark("benchmarks/pope_adversarial.jsonl")
    assert [(r.id, r.answer, r.rule) for r in pope] == [("1", "yes", "pope"), ("2", "no", "pope")]


def test_other_kinds_keep_official_ids(tmp_path: Path) -> None:
    specs = every_kind(tmp_path)
    out = tmp_path / "out"

    def imported(kind: str):
        _, _, paths = parse_spec(specs[kind])
        return read_benchmark(import_benchmark(kind, paths, out))

    assert [r.id for r in imported("okvqa")] == ["420"]
    textvqa = imported("textvqa")
    assert textvqa[0].id == "34602" and textvqa[0].rule == "vqav2"
    vizwiz = imported("vizwiz")
    assert vizwiz[0].id == "VizWiz_val_00000001" and vizwiz[0].rule == "vizwiz"
    gqa = imported("gqa")
    assert (gqa[0].id, gqa[0].type, gqa[0].answer, gqa[0].rule) == (
        "20968379",
        "text",
        "yes",
        "gqa",
    )
    sqa = imported("scienceqa")  # test problems with an image only
    assert [(r.id, r.answer, r.rule, r.hint) for r in sqa] == [
        ("5", "B", "single", "Look at the picture.")
    ]
    assert sqa[0].extra["categories"] == ["natural", "has_text", "has_image", "grade_1_6"]
    seed = imported("seed")  # image questions only
    assert [(r.id, r.answer, len(r.options)) for r in seed] == [("101669", "C", 4)]
    assert seed[0].extra["categories"] == ["Instances Counting"]  # the JSON's own name
    coco = imported("coco_karpathy")  # the Karpathy test split only
    assert [(r.id, r.references, r.prompt) for r in coco] == [
        ("391895", ("A man rides a bike.", "A cyclist on a road."), "coco_caption")
    ]
    assert imported("flickr30k")[0].id == "1000092795"
    assert imported("nocaps")[0].references == ("A dog.", "A brown dog.")
    # Video QA: open-ended, exact match; each question points at its video file.
    msrvtt = imported("msrvtt_qa")
    assert [(r.id, r.type, r.answer, r.prompt, Path(r.videos[0]).name) for r in msrvtt] == [
        ("158581", "text", "square", "short_answer", "video7010.mp4"),
        ("158582", "text", "right", "short_answer", "video7011.mp4"),
    ]
    assert msrvtt[0].images == () and msrvtt[0].extra["category_id"] == 0
    msvd = imported("msvd_qa")  # video_id -> vid<N> -> clip name (youtube_mapping.txt)
    assert [(r.id, Path(r.videos[0]).name) for r in msvd] == [
        ("30933", "zzit5b_-ukg_5_20.avi"),
        ("30934", "-4wsuPCjDBc_5_15.avi"),
    ]


def test_mmbench_is_scored_per_category_and_l2_category(tmp_path: Path) -> None:
    """VLMEvalKit reports MMBench per `category` and per `l2-category`, on circular hits: a
    question counts only if every copy of it is right."""
    from owl.eval.scoring import score

    write_mmbench(tmp_path)
    records = read_benchmark(import_benchmark(
        "mmbench", [tmp_path / "mmbench_dev_20230712.tsv"], tmp_path / "out", "mmbench"))  # fmt: skip
    assert [r.extra["categories"] for r in records] == [
        ["color", "attr"],
        ["shape", "attr"],
        ["shape", "attr"],
    ]
    # Question 0 right; question 1 right as given (A) but its copy, whose answer is C, wrong.
    replies = {"0": "B", "1": "A", "1000001": "A"}
    predictions = [{"id": r.id, "shift": 0, "prediction": replies[r.id]} for r in records]
    metrics = score(records, predictions, caption_meteor=False)
    assert metrics["multiple_choice.accuracy"] == 1.0
    assert metrics["multiple_choice.circular_accuracy"] == 0.5
    categories = ("attr", "color", "shape")
    assert {k: v for k, v in metrics.items() if k.rsplit("_", 1)[-1] in categories} == {
        "multiple_choice.accuracy_attr": 1.0, "multiple_choice.count_attr": 2.0,
        "multiple_choice.circular_accuracy_attr": 0.5,
        "multiple_choice.accuracy_color": 1.0, "multiple_choice.count_color": 1.0,
        "multiple_choice.circular_accuracy_color": 1.0,
        "multiple_choice.accuracy_shape": 1.0, "multiple_choice.count_shape": 1.0,
        "multiple_choice.circular_accuracy_shape": 0.0,
    }  # fmt: skip


def test_owl_eval_scores_every_kind_from_official_files(tmp_path: Path, capsys) -> None:
    specs = every_kind(tmp_path)
    model = make_model(tmp_path / "model", make_tokenizer(tmp_path / "tok"))
    argv = ["eval", "--model", str(model), "--json", "--no-meteor", "--batch-size", "4",
            "--caption-tokenizer", "ptb" if java_available() else "approx"]  # fmt: skip
    for spec in specs.values():
        argv += ["--benchmark", spec]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert set(metrics) == set(specs)
    assert 0 <= metrics["vqav2"]["vqa.accuracy"] <= 1
    assert 0 <= metrics["gqa"]["text.accuracy"] <= 1
    assert {"multiple_choice.accuracy", "multiple_choice.circular_accuracy"} <= set(
        metrics["mmbench"]
    )
    mme = metrics["mme"]
    assert mme["yes_no.perception"] == pytest.approx(
        mme["yes_no.existence.score"] + mme["yes_no.artwork.score"]
    )
    assert {"yes_no.f1", "yes_no.yes_ratio"} <= set(metrics["pope"])
    cider = "caption.CIDEr" if java_available() else "caption.CIDEr_approx"
    assert all(cider in metrics[k] for k in ("coco_karpathy", "flickr30k", "nocaps"))
    for kind in ("msrvtt_qa", "msvd_qa"):  # asked with each video's frames, exact-match scored
        assert metrics[kind]["text.count"] == 2 and 0 <= metrics[kind]["text.accuracy"] <= 1


def test_submission_files(tmp_path: Path) -> None:
    from openpyxl import load_workbook

    write_vqav2(tmp_path)
    testdev = read_benchmark(import_benchmark(
        "vqav2", [tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
                  tmp_path / "test2015"], tmp_path / "out", "vqav2_testdev"))  # fmt: skip
    path = write_submission(tmp_path / "sub" / "vqav2_testdev", "vqav2", testdev,
                            [{"id": "7005", "shift": 0, "prediction": "yes"}])  # fmt: skip
    assert json.loads(path.read_text()) == [{"question_id": 7005, "answer": "yes"}]

    (tmp_path / "vw_test").mkdir()
    _json(tmp_path / "test.json", [{"image": "VizWiz_test_00000003.jpg", "question": "What?"}])
    from official_files import _image

    _image(tmp_path / "vw_test" / "VizWiz_test_00000003.jpg")
    vizwiz = read_benchmark(import_benchmark("vizwiz", [tmp_path / "test.json", tmp_path / "vw_test"],
                                             tmp_path / "out", "vizwiz_test"))  # fmt: skip
    assert submission_format(vizwiz) == "vizwiz"
    path = write_submission(tmp_path / "sub" / "vizwiz_test", "vizwiz", vizwiz,
                            [{"id": "VizWiz_test_00000003", "shift": 0, "prediction": "unanswerable"}])  # fmt: skip
    assert json.loads(path.read_text()) == [
        {"image": "VizWiz_test_00000003.jpg", "answer": "unanswerable"}
    ]

    write_mmbench(tmp_path, with_answers=False, name="mmbench_test_en_20231003.tsv")
    test = read_benchmark(import_benchmark("mmbench", [tmp_path / "mmbench_test_en_20231003.tsv"],
                                           tmp_path / "out", "mmbench_test"))  # fmt: skip
    assert submission_format(test) == "mmbench"
    predictions = [{"id": r.id, "shift": 0, "prediction": p} for r, p in zip(test, "BAC")]
    sheet = write_submission(tmp_path / "sub" / "mmbench_test", "mmbench", test, predictions)
    rows = list(load_workbook(sheet).active.iter_rows(values_only=True))
    assert rows[0] == ("index", "question", "A", "B", "C", "D", "prediction")
    assert rows[1] == (0, "What colour?", "red", "green", None, None, "B")
    assert [r[0] for r in rows[1:]] == [0, 1, 1000001]


def test_specs_and_errors(tmp_path: Path, capsys) -> None:
    assert parse_spec("vqav2:q.json,a.json,images/") == (
        "vqav2",
        "vqav2",
        ["q.json", "a.json", "images/"],
    )
    assert parse_spec("dev=mmbench:x.tsv") == ("dev", "mmbench", ["x.tsv"])
    assert parse_spec("@shapes/benchmarks/vqa.jsonl") is None
    assert parse_spec("runs/x:y.jsonl") is None
    _json(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [{"image_id": 1}]})
    (tmp_path / "images").mkdir()
    code = main(["bench", "import", "vqav2", str(tmp_path / "q.json"), str(tmp_path / "images"),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "'question_id' missing" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="unknown benchmark kind"):
        import_benchmark("vqa3", [], tmp_path)


def test_spec_files_are_in_the_cache_key(tmp_path: Path) -> None:
    from pipelines import cache

    write_vqav2(tmp_path)
    q = str(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json")
    images = str(tmp_path / "test2015")
    found = cache.input_paths({"benchmarks": [f"vqav2:{q},{images}", "@shapes/b/vqa.jsonl"]})
    assert found == sorted([q, images])

"""`owl eval` and `owl chat` through the real CLI entry point, with stdin piped into chat."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from eval_helpers import make_benchmarks, make_model, make_tokenizer

from owl.data.image import preprocess_images
from owl.data.templates import Turn
from owl.data.tokenize import encode_prompt
from owl.data.tokenizer import load_tokenizer
from owl.model import load_model
from pipelines.cli import main
from pipelines.commands.eval import resolve_model_dirs


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_cli")
    tokenizer_dir = make_tokenizer(root / "tokenizer")
    return {"model": make_model(root / "model", tokenizer_dir), **make_benchmarks(root / "bench")}


def test_eval_prints_json_metrics_and_writes_predictions(
    artefacts: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["eval", "--model", str(artefacts["model"]), "--benchmark", str(artefacts["vqa"]),
            "--benchmark", str(artefacts["multiple_choice"]), "--batch-size", "4", "--json",
            "--predictions", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) == {"vqa", "multiple_choice"}
    assert 0.0 <= result["metrics"]["vqa"]["vqa.accuracy"] <= 1.0
    assert result["metrics"]["multiple_choice"]["multiple_choice.count"] == 3.0
    names = ["multiple_choice.parquet", "units", "vqa.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == names[::2]  # owl compare
    vqa = result["metrics"]["vqa"]
    assert vqa["vqa.accuracy_ci95_low"] <= vqa["vqa.accuracy"] <= vqa["vqa.accuracy_ci95_high"]


def test_model_and_tokenizer_folders_are_found(artefacts: dict[str, Path], tmp_path: Path) -> None:
    model_dir = artefacts["model"]
    assert resolve_model_dirs(str(model_dir), None) == (model_dir, model_dir / "tokenizer")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_dirs(str(tmp_path), None)


def _greedy(model, tokenizer, turns: list[Turn], images: list[bytes], max_new: int) -> str:
    cfg = model.cfg
    ids = encode_prompt(
        tokenizer, turns, variant=cfg.variant, num_visual_tokens=cfg.num_visual_tokens
    )
    pixels = [preprocess_images(images, cfg.vision.image_size, cfg.image_mode)] if images else None
    [reply] = model.generate(
        [ids], pixels, max_new_tokens=max_new, eos_token_id=tokenizer.eos_token_id
    )
    return tokenizer.decode(reply, skip_special_tokens=True)


def test_chat_multi_turn_with_image_added_mid_conversation(
    artefacts: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image_path = artefacts["vqa"].parent / "images" / "red.png"
    script = f"What colour?\n/image {image_path}\nAnd now?\n/reset\nHello\n/quit\nnot read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--model", str(artefacts["model"]), "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()

    # The same conversation, built by hand with the training template and batched generate.
    model = load_model(artefacts["model"]).eval()
    tokenizer = load_tokenizer(artefacts["model"] / "tokenizer")
    first = _greedy(model, tokenizer, [Turn("user", "What colour?")], [], 5)
    second_turns = [
        Turn("user", "What colour?"),
        Turn("assistant", first.strip()),
        Turn("user", "<|image|>And now?"),
    ]
    second = _greedy(model, tokenizer, second_turns, [image_path.read_bytes()], 5)
    third = _greedy(model, tokenizer, [Turn("user", "Hello")], [], 5)  # after /reset
    assert captured.out == "".join(r.lstrip() + "\n" for r in (first, second, third))
    assert "image added" in captured.err and "conversation reset" in captured.err


def test_chat_json_lines_and_bad_image(
    artefacts: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("/image /no/such.png\nHi\n/what\n"))
    assert (
        main(["chat", "--model", str(artefacts["model"]), "--max-new-tokens", "3", "--json"]) == 0
    )
    captured = capsys.readouterr()
    assert [set(json.loads(line)) for line in captured.out.splitlines()] == [{"reply"}]
    assert "no image file" in captured.err and "unknown command /what" in captured.err

"""The exported release folder, loaded the way the authors' users load it, in the authors' own stack:
transformers 4.31.0 (mPLUG-Owl2) and 4.28.1 (mPLUG-Owl), each in its own virtual environment
(tests/integration/release_loaders/requirements-*.txt, from PyPI with uv; built once into the
user cache, ~10 s each from an empty uv cache, then reused). The calls are those of their builder and
README (`release_loaders/load_as_the_authors.py`); their model classes are not run (no copy of
their code): the weights' parity with their numerics is tests/unit/test_model_releases.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl.data.image import CLIP_STD, preprocess_images
from owl.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from owl.model import OwlModel, get_config, save_model
from pipelines.cli import main as owl_cli

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent / "release_loaders"
VERSIONS = {"owl2": "4.31.0", "owl1": "4.28.1"}
TEXTS = ["the red circle is above the blue square", "What colour is the star? Answer: green."]
CORPUS = [
    "the red circle is above the blue square",
    "a green star left of a yellow triangle. What colour is the star?",
    "Answer the question using a single word or phrase.",
] * 40


def _python311() -> str:
    if sys.version_info[:2] == (3, 11):
        return getattr(sys, "_base_executable", sys.executable)
    found = shutil.which("python3.11")
    if found is None:  # tokenizers 0.13.3, which both stacks need, has wheels up to 3.11
        pytest.skip("the authors' stacks install on Python 3.11; none found")
    return found


def authors_python(version: str) -> Path:
    """The authors' stack for `version` in its own venv, built once per pin list into the cache
    (OWL_CACHE_DIR, else ~/.cache/owl): a build goes to a temporary folder renamed when done."""
    pins = HERE / f"requirements-{version}.txt"
    digest = hashlib.sha256(pins.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("OWL_CACHE_DIR", Path.home() / ".cache" / "owl"))
    env = cache / "release-loaders" / f"transformers-{version}-{digest}"
    if not (env / "bin" / "python").exists():
        building = env.with_name(env.name + f".building-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run([_python311(), "-m", "venv", "--without-pip", str(building)], check=True)
        # uv (a dev dependency): parallel downloads, ~10 s for either stack from an empty cache
        # where pip took 1.5 to 3 min here
        subprocess.run(
            [str(Path(sys.executable).parent / "uv"), "pip", "install", "-q", "--system-certs",
             "--python", str(building / "bin" / "python"), "--no-deps", "--only-binary", ":all:",
             "-r", str(pins)],
            check=True,
        )  # fmt: skip
        # The renamed interpreter finds its packages through the pyvenv.cfg beside it (the venv's
        # scripts keep the old path in their first line: none is used).
        building.rename(env)
    return env / "bin" / "python"


def _run(python: Path, request: dict, tmp_path: Path) -> dict:
    path = tmp_path / f"request-{len(list(tmp_path.glob('request-*')))}.json"
    path.write_text(json.dumps(request))
    done = subprocess.run(
        [str(python), str(HERE / "load_as_the_authors.py"), str(path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout) if done.stdout.strip() else {}


def _model(tmp_path: Path, variant: str, vocab_size: int) -> Path:
    cfg = get_config("debug-tiny", variant, abstractor={"norm_eps": 1e-5})
    cfg = cfg.replace(
        decoder={"vocab_size": vocab_size, "num_kv_heads": cfg.decoder.num_heads}, image_mode="pad"
    )
    save_model(OwlModel(cfg), tmp_path / "ours")
    return tmp_path / "ours"


def _image(tmp_path: Path) -> Path:
    """A non-square photo-like image: their padding and ours must agree (or stretch alike)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    return tmp_path / "image.png"


@pytest.mark.parametrize("variant", ["owl2", "owl1"])
def test_a_release_with_our_bpe_tokenizer_loads_in_the_authors_stack(tmp_path, variant) -> None:
    python = authors_python(VERSIONS[variant])
    tokenizer = train_bpe_tokenizer(iter(CORPUS), 300, tmp_path / "tokenizer")
    ours = _model(tmp_path, variant, len(tokenizer))
    release = tmp_path / "release"
    code = owl_cli(["convert", "to-release", str(ours), str(release), "--tokenizer",
                    str(tmp_path / "tokenizer")])  # fmt: skip
    assert code == 0
    got = _run(python, {"folder": str(release), "variant": variant, "texts": TEXTS,
                        "image": str(_image(tmp_path))}, tmp_path)  # fmt: skip
    assert got["transformers"] == VERSIONS[variant]
    assert got["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert got["special_ids"] == [1, 2, 0] and got["generation"] == [1, 2, 0]
    # The ids our model was trained on: BOS, then the text as our tokenizer encodes it.
    ours_tok = load_tokenizer(tmp_path / "tokenizer")
    assert got["ids"] == [[1, *ours_tok(t, add_special_tokens=False).input_ids] for t in TEXTS]
    assert got["decoded"] == TEXTS
    model_cfg = get_config("debug-tiny", variant)
    size = model_cfg.vision.image_size
    theirs = np.array(got["pixels"], dtype=np.float32)
    mine = preprocess_images([Image.open(tmp_path / "image.png")], size, "pad")[0].numpy()
    assert theirs.shape == mine.shape == (3, size, size)
    if variant == "owl1":  # their processor stretches to the square: ours in "resize" mode
        mine = preprocess_images([Image.open(tmp_path / "image.png")], size, "resize")[0].numpy()
        assert np.abs(theirs - mine).max() < 1e-5
    else:  # the image itself is equal; the padding one level apart in two channels: their pad
        # colour truncates CLIP's mean (122, 116, 104), ours rounds it (123, 117, 104)
        assert np.abs(theirs - mine)[:, 10:22, :].max() < 1e-5
        pad_step = (mine - theirs)[:, :3, :].reshape(3, -1) * np.array(CLIP_STD)[:, None] * 255
        assert np.allclose(pad_step, np.array([[1.0], [1.0], [0.0]]), atol=1e-3)
    text = got["text_config"]
    assert (text["vocab_size"], text["hidden_size"], text["num_hidden_layers"]) == (
        len(tokenizer), model_cfg.decoder.hidden, model_cfg.decoder.num_layers)  # fmt: skip
    assert text["rms_norm_eps"] == model_cfg.decoder.rms_norm_eps
    assert text["max_position_embeddings"] == model_cfg.decoder.max_positions
    if variant == "owl2":
        assert got["context_len"] == model_cfg.decoder.max_positions
    else:  # 4.28.1 without the safetensors package cannot read model.safetensors: said in the card
        assert got["safetensors_available"] is False


def test_a_release_with_llamas_sentencepiece_tokenizer_is_their_llama_tokenizer(tmp_path) -> None:
    """A tokenizer folder holding LLaMA's tokenizer.model (a small one trained here with the
    sentencepiece of their stack) gives a release whose tokenizer is transformers' LlamaTokenizer,
    BOS first, and the sentencepiece ids."""
    python = authors_python(VERSIONS["owl2"])
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
    (tmp_path / "tokenizer").mkdir()
    spm = {"corpus": str(tmp_path / "corpus.txt"), "prefix": str(tmp_path / "tokenizer" / "tokenizer"),
           "vocab_size": 80}  # fmt: skip
    _run(python, {"train_sentencepiece": spm}, tmp_path)
    ours = _model(tmp_path, "owl2", 80)
    release = tmp_path / "release"
    assert owl_cli(["convert", "to-release", str(ours), str(release), "--weights", "bin",
                    "--tokenizer", str(tmp_path / "tokenizer"), "--json"]) == 0  # fmt: skip
    assert (release / "pytorch_model.bin").exists() and not list(release.glob("*.safetensors"))
    got = _run(python, {"folder": str(release), "variant": "owl2", "texts": TEXTS,
                        "image": str(_image(tmp_path))}, tmp_path)  # fmt: skip
    assert got["tokenizer_class"] == "LlamaTokenizer"
    assert got["ids"] == [[1, *ids] for ids in got["sentencepiece_ids"]]
    assert all(len(ids) > 3 for ids in got["sentencepiece_ids"])

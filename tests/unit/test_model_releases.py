"""The authors' released layouts (Owl2 and Owl1) as their save_pretrained writes them, buffers
included: converted, compared with a plain forward of their numerics, and written back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from owl import IMAGE_TOKEN_ID
from owl.model import load_model
from owl.model.hf_import import read_hf_state_dict
from owl.model.variants import get_variant
from pipelines.cli import main as owl_cli
from tests.unit import release_reference as ref

VARIANTS = {"owl2": "mplug-owl2", "owl1": "mplug-owl"}


def _error_line(stderr: str) -> str:
    """The command's error: one `error: ...` line, the last, no traceback (progress lines before)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, three images (one row holds two), text before, between and after them."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, ref.SIZES["vocab"], (2, 3 * k + 5), generator=g)
    ids[0, 2 : 2 + k] = IMAGE_TOKEN_ID
    ids[1, 1 : 1 + k] = IMAGE_TOKEN_ID
    ids[1, k + 3 : 2 * k + 3] = IMAGE_TOKEN_ID
    images = torch.randn(3, 3, ref.SIZES["image"], ref.SIZES["image"], generator=g)
    return ids, ids == IMAGE_TOKEN_ID, images


@pytest.mark.parametrize("variant", ["owl2", "owl1"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_release_converts_with_logits_equal_to_their_numerics(
    tmp_path: Path, variant: str, fmt: str, capsys
) -> None:
    state, config = ref.make_release(variant)
    src = ref.write_release(state, config, tmp_path / "release", fmt)
    code = owl_cli(["convert", VARIANTS[variant], str(src), str(tmp_path / "ours"), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    buffers = [k for k in state if "inv_freq" in k or "pos_embed" in k]
    assert out["total_params"] == sum(t.numel() for k, t in state.items() if k not in buffers)
    model = load_model(tmp_path / "ours").eval()
    cfg = model.cfg
    assert cfg.variant == variant
    assert (cfg.abstractor.norm_eps, cfg.abstractor.layer_norm_eps) == (1e-5, 1e-6)
    assert cfg.vision.layer_norm_eps == 1e-6
    ids, slots, images = _batch(cfg.num_visual_tokens)
    with torch.no_grad():
        ours = model(ids, images)
        theirs = ref.logits(state, variant, ref.SIZES, ids, slots, images)
    diff = (ours - theirs).abs()
    assert diff.max().item() <= 1e-5, diff.max().item()
    assert diff[slots].max().item() <= 1e-5  # visual positions included
    assert theirs.abs().mean() > 0.1  # not a comparison of zeros


def test_a_wrong_abstractor_eps_is_visible_at_this_tolerance(tmp_path: Path) -> None:
    """The check above can fail: with the config eps on every abstractor norm (our old numerics)
    the logits move by more than 1e-5."""
    state, config = ref.make_release("owl2")
    ref.write_release(state, config, tmp_path / "release")
    owl_cli(["convert", "mplug-owl2", str(tmp_path / "release"), str(tmp_path / "ours")])
    cfg_path = tmp_path / "ours" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["abstractor"]["norm_eps"] = cfg["abstractor"]["layer_norm_eps"]
    cfg_path.write_text(json.dumps(cfg))
    model = load_model(tmp_path / "ours").eval()
    ids, slots, images = _batch(model.cfg.num_visual_tokens)
    with torch.no_grad():
        diff = model(ids, images) - ref.logits(state, "owl2", ref.SIZES, ids, slots, images)
    assert diff.abs().max().item() > 1e-5


@pytest.mark.parametrize(
    "key, change",
    [
        ("model.layers.1.self_attn.rotary_emb.inv_freq", lambda t: t * 1.5),
        ("model.visual_abstractor.encoder.layers.0.crossattention.attention.k_pos_embed",
         lambda t: t.flip(0)),
        ("model.visual_abstractor.encoder.layers.1.crossattention.attention.q_pos_embed",
         lambda t: t[:-1]),
    ],
)  # fmt: skip
def test_a_saved_buffer_that_differs_from_ours_is_a_clear_error(
    tmp_path: Path, key: str, change, capsys
) -> None:
    state, config = ref.make_release("owl2")
    state[key] = change(state[key])
    ref.write_release(state, config, tmp_path / "release")
    code = owl_cli(["convert", "mplug-owl2", str(tmp_path / "release"), str(tmp_path / "o")])
    err = _error_line(capsys.readouterr().err)
    assert code == 2 and f"buffer {key}" in err


def test_buffers_in_bf16_are_accepted(tmp_path: Path) -> None:
    """A release saved in bf16 rounds its buffers too: checked at bf16's precision."""
    state, config = ref.make_release("owl2")
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    ref.write_release(state, config, tmp_path / "release")
    assert owl_cli(["convert", "mplug-owl2", str(tmp_path / "release"), str(tmp_path / "o")]) == 0


def test_unknown_keys_and_missing_folders_are_one_line_errors(tmp_path: Path, capsys) -> None:
    state, config = ref.make_release("owl1")
    state["language_model.mystery.weight"] = torch.zeros(2)
    ref.write_release(state, config, tmp_path / "release")
    assert owl_cli(["convert", "mplug-owl", str(tmp_path / "release"), str(tmp_path / "o")]) == 2
    assert "language_model.mystery.weight" in _error_line(capsys.readouterr().err)
    assert owl_cli(["convert", "mplug-owl2", str(tmp_path / "release"), str(tmp_path / "o")]) == 2
    assert "not an mPLUG-Owl2 release" in capsys.readouterr().err
    assert owl_cli(["convert", "mplug-owl2", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["owl2", "owl1"])
def test_export_to_the_release_layout_round_trips_exactly(tmp_path: Path, variant: str) -> None:
    # Owl1 runs on transformers 4.28.1's LLaMA: no grouped KV heads (refused at export, below).
    sizes = ref.SIZES if variant == "owl2" else {**ref.SIZES, "kv_heads": ref.SIZES["heads"]}
    state, config = ref.make_release(variant, sizes)
    ref.write_release(state, config, tmp_path / "release", "safetensors")
    owl_cli(["convert", VARIANTS[variant], str(tmp_path / "release"), str(tmp_path / "ours")])
    assert owl_cli(["convert", "to-release", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = read_hf_state_dict(tmp_path / "back")
    assert set(back) == set(state)  # parameters and buffers, their names
    for key, tensor in state.items():
        if "pos_embed" in key:  # recomputed: equal to float32 rounding of their numpy values
            assert torch.allclose(back[key], tensor, atol=1e-5), key
        else:
            assert torch.equal(back[key], tensor), key
    config_back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config_back["model_type"] == config["model_type"]
    # and back again: the same model
    owl_cli(["convert", VARIANTS[variant], str(tmp_path / "back"), str(tmp_path / "again")])
    first, second = load_model(tmp_path / "ours"), load_model(tmp_path / "again")
    assert first.cfg == second.cfg
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_release_layouts_name_every_parameter_of_our_model() -> None:
    from owl.model import OwlModel, get_config
    from owl.model.releases import name_map

    for variant in ("owl2", "owl1"):
        layout = get_variant(variant)
        cfg = get_config("debug-tiny", variant)
        ours = set(OwlModel(cfg).state_dict())
        qkv = {k for k in ours if ".attn." in k and k.startswith("vision.") and "o_proj" not in k}
        assert set(name_map(cfg, layout).values()) == ours - qkv


def test_documented_convert_commands_run_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    import re
    import shlex

    docs = Path(__file__).resolve().parents[2] / "docs" / "model.md"
    blocks = re.findall(r"```bash\n(.*?)```", docs.read_text(), re.DOTALL)
    commands = [line for b in blocks for line in b.splitlines() if line.startswith("owl convert")]
    assert len(commands) == 4
    monkeypatch.chdir(tmp_path)
    for variant, folder in (("owl2", "mplug-owl2-llama2-7b"), ("owl1", "mplug-owl-llama-7b")):
        sizes = {**ref.SIZES, "kv_heads": ref.SIZES["heads"]}  # Owl1 releases: no grouped KV
        ref.write_release(*ref.make_release(variant, sizes), tmp_path / folder)
    from owl.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(iter(["a red circle", "a blue square"] * 20), 270, "tokenizer")
    for command in commands:
        assert owl_cli(shlex.split(command)[1:]) == 0, command
    capsys.readouterr()
    assert load_model("out/owl2").cfg.variant == "owl2"
    assert load_model("out/owl1").cfg.variant == "owl1"
    assert (
        json.loads(Path("out/owl2-release/config.json").read_text())["model_type"] == "mplug_owl2"
    )
    assert Path("out/owl1-release/pytorch_model.bin").exists()
    assert Path("out/owl1-release/tokenizer.json").exists()


@pytest.mark.parametrize("name", ["owl2-llama2-7b", "owl1-llama-7b"])
def test_a_7b_release_layout_gives_exactly_the_recipe_model_config(name: str) -> None:
    """At full size (tensors on the meta device: shapes only), a release whose config.json leaves
    the eps to their classes' defaults converts to the recipe's config: `init` from the authors'
    release needs no model.overrides."""
    from owl.model import OwlModel, get_config
    from owl.model.releases import config_from_release, from_release, release_config, to_release

    cfg = get_config(name)
    layout = get_variant(cfg.variant)
    with torch.device("meta"):
        ours = OwlModel(cfg).state_dict()
    theirs = to_release(cfg, ours, layout)
    hf = release_config(cfg, layout)
    if cfg.variant == "owl2":
        vision, abstractor = hf["visual_config"]["visual_model"], hf["visual_config"]["visual_abstractor"]  # fmt: skip
    else:
        vision, abstractor = hf["vision_config"], hf["visual_abstractor_config"]
    del vision["layer_norm_eps"], abstractor["layer_norm_eps"]
    got = config_from_release(hf, theirs, layout, get_config(name))
    assert got == cfg
    buffers = [k for k in theirs if k.endswith(("pos_embed", "inv_freq"))]
    params = {k: v for k, v in theirs.items() if k not in buffers}
    assert set(from_release(got, params, layout, "meta")) == set(ours)


def _save_tiny(path: Path, variant: str, **overrides) -> Path:
    from owl.model import OwlModel, get_config, save_model

    cfg = get_config("debug-tiny", variant, abstractor={"norm_eps": 1e-5})
    cfg = cfg.replace(decoder={"num_kv_heads": cfg.decoder.num_heads})
    save_model(OwlModel(cfg.replace(**overrides)), path)
    return path


@pytest.mark.parametrize(
    "variant, overrides, field",
    [
        ("owl1", {"decoder": {"rope_theta": 5e5}}, "decoder.rope_theta"),
        ("owl1", {"decoder": {"num_kv_heads": 2}}, "decoder.num_kv_heads"),
        ("owl1", {"abstractor": {"positional_embeddings": True}}, "abstractor.positional_embeddings"),
        ("owl2", {"decoder": {"modality_adaptive": False}}, "decoder.modality_adaptive"),
        ("owl2", {"abstractor": {"norm_eps": 1e-6}}, "abstractor.norm_eps"),
        ("owl2", {"vision": {"num_channels": 1}}, "vision.num_channels"),
    ],
)  # fmt: skip
def test_a_config_their_code_cannot_honour_is_refused_naming_the_field(
    tmp_path: Path, variant: str, overrides: dict, field: str, capsys
) -> None:
    ours = _save_tiny(tmp_path / "ours", variant, **overrides)
    assert owl_cli(["convert", "to-release", str(ours), str(tmp_path / "release")]) == 2
    assert _error_line(capsys.readouterr().err).startswith(f"error: model.{field} is ")
    assert not (tmp_path / "release").exists()


def test_owl2_keeps_rope_theta_and_grouped_kv_heads_its_config_class_honours(tmp_path) -> None:
    """mPLUG-Owl2's own LlamaConfig reads rope_theta and num_key_value_heads: exported as is."""
    ours = _save_tiny(tmp_path / "ours", "owl2", decoder={"rope_theta": 5e5, "num_kv_heads": 2})
    assert owl_cli(["convert", "to-release", str(ours), str(tmp_path / "release")]) == 0
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert (config["rope_theta"], config["num_key_value_heads"]) == (5e5, 2)


def test_the_release_folder_holds_what_their_loaders_read(tmp_path: Path, capsys) -> None:
    from owl.data.image import CLIP_MEAN
    from owl.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(iter(["the red circle", "a blue square"] * 20), 270, tmp_path / "tok")
    ours = _save_tiny(tmp_path / "ours", "owl2", image_mode="resize")
    argv = ["convert", "to-release", str(ours), str(tmp_path / "rel"), "--tokenizer",
            str(tmp_path / "tok"), "--weights", "bin", "--json"]  # fmt: skip
    assert owl_cli(argv) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert set(files) == {p.name for p in (tmp_path / "rel").iterdir()}
    assert {"pytorch_model.bin", "config.json", "preprocessor_config.json",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} == set(files)  # fmt: skip
    read = {name: json.loads((tmp_path / "rel" / name).read_text()) for name in files
            if name.endswith(".json")}  # fmt: skip
    assert read["config.json"]["image_aspect_ratio"] == "resize"
    assert read["config.json"]["max_sequence_length"] == 512
    processor = read["preprocessor_config.json"]
    assert processor["size"] == {"shortest_edge": 32} and processor["resample"] == 3
    assert processor["crop_size"] == {"height": 32, "width": 32}
    assert processor["image_mean"] == list(CLIP_MEAN)
    assert read["generation_config.json"] == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}  # fmt: skip
    assert read["tokenizer_config.json"]["tokenizer_class"] == "PreTrainedTokenizerFast"
    model = read["tokenizer.json"]["model"]
    assert "ignore_merges" not in model and all(isinstance(m, str) for m in model["merges"])
    # the weights convert back
    assert owl_cli(["convert", "mplug-owl2", str(tmp_path / "rel"), str(tmp_path / "back")]) == 0


def test_a_tokenizer_with_no_checked_old_form_is_refused(tmp_path: Path) -> None:
    from owl.model.release_files import legacy_tokenizer_json

    data = {"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": None, "decoder": None}
    with pytest.raises(ValueError, match="tokenizer.json model is WordPiece, not BPE"):
        legacy_tokenizer_json(data, tmp_path)

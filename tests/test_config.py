"""The ``fusellm run`` configuration: presets, key-naming errors, file-system validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from fusellm.config import (
    PRESETS,
    ConfigError,
    PipelineConfig,
    describe_config,
    load_config,
    validate_config,
)
from models import build_named, quiet

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def minimal(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "target": {"path": "models/target"},
        "sources": [{"name": "neox", "path": "models/neox"}],
        "data": {"train": "train.jsonl"},
    }
    raw.update(over)
    return raw


def error_of(raw: Any, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        PipelineConfig.from_dict(raw, **kw)
    return exc.value


# --- presets and loading -------------------------------------------------------------------------


def test_improved_is_the_default_preset() -> None:
    c = PipelineConfig.from_dict(minimal(), base_dir="/w")
    assert c.preset == "improved"
    assert c.target.name == "target"
    assert c.target.path == "/w/models/target"
    assert (c.vocab_map.method, c.align.method, c.align.vocab) == ("surface", "offsets", "soft")
    assert (c.align.compat, c.align.fallback, c.split.boundary) == (None, "next", "word")
    assert c.train.args["score"] == "ce_per_byte"
    assert c.train.control is True
    assert c.extract.top_k == 10
    assert c.block_size == 2048


def test_reference_preset_is_the_papers_setting() -> None:
    c = PipelineConfig.from_dict(minimal(preset="reference"))
    assert (c.vocab_map.method, c.align.method, c.align.vocab) == ("mined", "mined", "soft")
    assert c.align.compat == "fusellm"
    assert c.split.boundary == "reference"
    a = c.train.args
    assert (a["fusion"], a["combine"], a["lm_loss_weight"], a["teacher_temperature"]) == (
        "mince",
        "hard",
        0.9,
        1.0,
    )
    assert a["compat"] == "fusellm"
    assert a["score"] == "ce"
    assert a["learning_rate"] == 1e-5
    assert (a["adam_beta1"], a["adam_beta2"]) == (0.9, 0.95)  # the published command's
    assert c.extract.top_k == 10
    assert c.extract.values == "logits"
    assert c.block_size == 2048


def test_reference_betas_are_documented_the_same_everywhere() -> None:
    """The preset, examples/reference.yaml and docs/training.md's paper setting agree."""
    ref = load_config(EXAMPLES / "reference.yaml").train.args
    docs = (EXAMPLES.parent / "docs" / "training.md").read_text(encoding="utf-8")
    block = docs.split("```yaml\n# fuse.yaml: the paper's setting", 1)[1].split("```", 1)[0]
    paper = yaml.safe_load(block.split("\n", 1)[1])  # after the header line
    for key in ("adam_beta1", "adam_beta2", "learning_rate", "lr_scheduler_type"):
        assert ref[key] == paper[key] == PRESETS["reference"]["train"][key], key


def test_file_wins_over_the_preset_key_by_key_explicit_null_included() -> None:
    c = PipelineConfig.from_dict(
        minimal(preset="reference", align={"compat": None}, train={"learning_rate": "2e-4"})
    )
    assert c.align.compat is None  # the explicit null, not the preset's "fusellm"
    assert c.align.method == "mined"  # the rest of the section still comes from the preset
    assert c.train.args["learning_rate"] == 2e-4  # YAML 1.1 reads 2e-4 as a string
    assert c.train.args["lm_loss_weight"] == 0.9
    # The preset argument overrides the file's preset key.
    assert PipelineConfig.from_dict(minimal(preset="reference"), preset="improved").preset == (
        "improved"
    )


def test_yaml_round_trip(tmp_path: Path) -> None:
    c = PipelineConfig.from_dict(
        minimal(seeds=[0, 3], sources=[{"name": "a", "path": "x", "domain": "code"}]),
        base_dir=tmp_path,
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(c.to_yaml(), encoding="utf-8")
    assert load_config(path) == c
    # A file's relative paths are relative to the file.
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.yaml").write_text(yaml.safe_dump(minimal()), encoding="utf-8")
    assert load_config(sub / "c.yaml").data.train == str(sub / "train.jsonl")


def test_examples_load_and_differ_only_by_fixes() -> None:
    ref = load_config(EXAMPLES / "reference.yaml")
    imp = load_config(EXAMPLES / "improved.yaml")
    assert ref.preset == "reference"
    assert imp.preset == "improved"
    assert ref.align.method == "mined"
    assert imp.align.method == "offsets"
    assert ref.vocab_map.method == "mined"
    assert imp.vocab_map.method == "surface"
    assert ref.train.args["score"] == "ce"
    assert imp.train.args["score"] == "ce_per_byte"
    for c in (ref, imp):
        assert c.extract.top_k == 10
        assert c.block_size == 2048
        assert c.train.args["lm_loss_weight"] == 0.9
        assert c.train.args["fusion"] == "mince"
        assert [s.name for s in c.sources] == ["openllama", "mpt"]


def test_describe_config_lists_every_key() -> None:
    text = describe_config()
    for key in (
        "target.path",
        "sources[i].domain",
        "data.heldout",
        "block_size",
        "seeds",
        "split.boundary",
        "extract.top_k",
        "vocab_map.method",
        "align.compat",
        "pack.mode",
        "train.control",
        "train.<field>",
        "evaluate.max_length",
    ):
        assert key in text, key
    for preset in PRESETS:
        assert f"preset {preset}:" in text


# --- errors that name the key --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        (minimal(sorces=[]), "sorces", ["unknown key", "did you mean 'sources'"]),
        (minimal(align={"methd": "mined"}), "align.methd", ["unknown key", "'method'"]),
        (minimal(align={"method": "dtw"}), "align.method", ['"offsets"', '"mined"', "dtw"]),
        (minimal(block_size="big"), "block_size", ["integer", "big"]),
        (minimal(block_size=32), "block_size", ["at least 64"]),
        (minimal(seeds=[0, 0]), "seeds", ["duplicates"]),
        (minimal(seeds=[-1]), "seeds[0]", [">= 0"]),
        (minimal(seeds=[]), "seeds", ["at least one"]),
        (minimal(sources=[]), "sources", ["at least one"]),
        (minimal(sources="neox"), "sources", ["list"]),
        (
            minimal(sources=[{"name": "neox", "path": "a"}, {"name": "neox", "path": "b"}]),
            "sources[1].name",
            ["already used by sources[0].name"],
        ),
        (minimal(sources=[{"name": "ref", "path": "a"}]), "sources[0].name", ["reserved"]),
        (minimal(sources=[{"name": "Neo-X", "path": "a"}]), "sources[0].name", ["lower-case"]),
        (minimal(sources=[{"name": "a"}]), "sources[0].path", ["required"]),
        (minimal(sources=[{"name": "a", "path": "p", "x": 1}]), "sources[0].x", ["unknown"]),
        (minimal(target={"name": "neox", "path": "t"}), "sources[0].name", ["already used"]),
        (minimal(preset="paper"), "preset", ["'improved'", "'reference'"]),
        (minimal(split={"margin": 2040}), "split.margin", ["16 tokens"]),
        (minimal(extract={"top_k": 0}), "extract.top_k", ["positive"]),
        (minimal(extract={"compression": "gzip"}), "extract.compression", ["zstd"]),
        (minimal(evaluate={"stride": 5000}), "evaluate.stride", ["[1, 2047]"]),
        (minimal(train={"learning_rat": 1e-5}), "train.learning_rat", ["'learning_rate'"]),
        (minimal(train={"output_dir": "x"}), "train.output_dir", ["set by the pipeline"]),
        (minimal(train={"seed": 3}), "train.seed", ["seeds"]),
        (minimal(train={"fusion": "avg"}), "train.fusion", ['"mince"', '"avgce"']),
        (minimal(train={"lm_loss_weight": 1.5}), "train.lm_loss_weight", ["[0, 1]"]),
        (minimal(train={"control": "yes"}), "train.control", ["true or false"]),
        (minimal(train={"max_steps": "many"}), "train.max_steps", ["integer"]),
        (minimal(train=[1]), "train", ["mapping"]),
        ({"sources": [], "data": {}}, "target", ["required"]),
        (minimal(data={"heldout": "h"}), "data.train", ["required"]),
        ([1, 2], "(top level)", ["mapping"]),
    ],
)
def test_static_errors_name_the_key(raw: Any, key: str, words: list[str]) -> None:
    err = error_of(raw)
    assert err.key == key, str(err)
    for w in words:
        assert w in str(err), str(err)
    assert f"config key {key!r}" in str(err)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: {path: x}\nsources: [{name: a, path: y}]\ndata: {train: z}\nk: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert exc.value.key == "k"
    assert str(bad) in str(exc.value)
    bad.write_text("target: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


# --- file-system validation ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a tiny Llama target (Mistral tokenizer, context 1024), a tiny GPT-NeoX
    source (DeepSeek tokenizer) and a data file."""
    root = tmp_path_factory.mktemp("cfg")
    build_named("llama", root)
    build_named("neox", root)
    (root / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n", encoding="utf-8")
    return root


def tiny_config(root: Path, **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "target": {"path": str(root / "llama")},
        "sources": [{"name": "neox", "path": str(root / "neox")}],
        "data": {"train": str(root / "train.jsonl")},
        "block_size": 512,
        "train": {"max_steps": 1},
    }
    raw.update(over)
    return raw


def validate_error(raw: dict[str, Any]) -> ConfigError:
    config = PipelineConfig.from_dict(raw)
    with quiet(), pytest.raises(ConfigError) as exc:
        validate_config(config)
    return exc.value


def test_valid_config_passes(tiny: Path) -> None:
    with quiet():
        info = validate_config(PipelineConfig.from_dict(tiny_config(tiny)))
    assert info["models"]["target"]["context"] == 1024
    assert info["models"]["neox"]["model_type"] == "gpt_neox"


def test_missing_model(tiny: Path) -> None:
    raw = tiny_config(tiny)
    raw["sources"].append({"name": "mpt", "path": str(tiny / "nowhere")})
    err = validate_error(raw)
    assert err.key == "sources[1].path"
    assert "does not exist" in str(err)


def test_directory_without_config_json(tiny: Path, tmp_path: Path) -> None:
    err = validate_error(tiny_config(tiny, target={"path": str(tmp_path)}))
    assert err.key == "target.path"
    assert "no config.json" in str(err)


def test_source_whose_tokenizer_cannot_be_loaded(tiny: Path, tmp_path: Path) -> None:
    broken = tmp_path / "neox"
    shutil.copytree(tiny / "neox", broken)
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    err = validate_error(tiny_config(tiny, sources=[{"name": "neox", "path": str(broken)}]))
    assert err.key == "sources[0].path"
    assert "cannot load a tokenizer" in str(err)
    # An explicit tokenizer directory is named by its own key.
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("[]", encoding="utf-8")
    err = validate_error(
        tiny_config(
            tiny,
            sources=[{"name": "neox", "path": str(tiny / "neox"), "tokenizer": str(tok_dir)}],
        )
    )
    assert err.key == "sources[0].tokenizer"
    assert "cannot load a tokenizer" in str(err)
    err = validate_error(
        tiny_config(
            tiny,
            sources=[
                {"name": "neox", "path": str(tiny / "neox"), "tokenizer": str(tmp_path / "x")}
            ],
        )
    )
    assert err.key == "sources[0].tokenizer"
    assert "does not exist" in str(err)


def test_block_size_larger_than_a_models_context(tiny: Path) -> None:
    err = validate_error(tiny_config(tiny, block_size=2048))
    assert err.key == "block_size"
    assert "larger than the context of target" in str(err)
    assert "1024" in str(err)


def test_missing_data(tiny: Path) -> None:
    err = validate_error(tiny_config(tiny, data={"train": str(tiny / "none.jsonl")}))
    assert err.key == "data.train"
    assert "does not exist" in str(err)
    err = validate_error(
        tiny_config(
            tiny,
            data={"train": str(tiny / "train.jsonl"), "heldout": str(tiny / "none.jsonl")},
        )
    )
    assert err.key == "data.heldout"


def test_train_settings_must_build_a_fusion_config(tiny: Path) -> None:
    # DeepSpeed without a launcher is refused by FusionConfig itself: reported under `train`.
    err = validate_error(tiny_config(tiny, train={"deepspeed": "zero2"}))
    assert err.key == "train"
    assert "launcher" in str(err)

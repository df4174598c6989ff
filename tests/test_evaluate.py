"""``fusellm evaluate``: true held-out perplexity against a direct computation on a tiny model."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from fusellm.errors import FuseLLMError, InputError
from models import TinyModel, build_named, load, quiet

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")

from fusellm.stages import evaluate as ev  # noqa: E402
from fusellm.stages.evaluate import (  # noqa: E402
    evaluate_perplexity,
    format_table,
    parse_model_args,
    plan_windows,
    run_evaluate,
)

TEXTS = [
    "The cat sat on the mat.",
    "Knowledge fusion of large language models with different tokenizers.",
    "café ☕ naïve — 東京",
    "",
    "def f(x):\n    return x + 1\n",
]
DOMAINS = ["prose", "prose", "mixed", "mixed", "code"]
LONG = " ".join(f"word{i} and more text" for i in range(20))  # about 100 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_named("llama", tmp_path_factory.mktemp("evaluate"))


@pytest.fixture(scope="module")
def loaded(tiny: TinyModel) -> tuple[Any, Any]:
    return load(tiny)


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text + tok.eos_token, add_special_tokens=False)["input_ids"])


def _manual_window(lm: Any, ids: list[int], first: int) -> tuple[float, int]:
    """Full unpadded forward of one window, float32 log_softmax, gather: NLL of ids[first:]."""
    with torch.inference_mode():
        logits = lm(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(ids[first:])
        nll = -lp[first - 1 : len(ids) - 1].gather(1, targets[:, None])[:, 0]
    return float(nll.double().sum()), len(ids) - first


def _evaluate(lm: Any, tok: Any, data: Any, **kw: Any) -> dict[str, Any]:
    kw.setdefault("progress", False)
    with quiet():
        return evaluate_perplexity(lm, data, tokenizer=tok, **kw)


def test_matches_a_manual_computation_per_domain(loaded: tuple[Any, Any]) -> None:
    lm, tok = loaded
    ds = datasets.Dataset.from_dict({"text": TEXTS, "domain": DOMAINS})
    got = _evaluate(lm, tok, ds, batch_size=1)
    assert list(got) == ["code", "mixed", "prose", "all"]
    for group in got:
        idx = [i for i, d in enumerate(DOMAINS) if group in (d, "all")]
        nll = tokens = nbytes = 0
        for i in idx:
            ids = _ids(tok, TEXTS[i])
            assert len(ids) < 1024  # one window each
            if len(ids) > 1:
                n, t = _manual_window(lm, ids, 1)
                nll += n
                tokens += t
            nbytes += len(TEXTS[i].encode("utf-8"))
        g = got[group]
        assert g["documents"] == len(idx)
        assert g["tokens"] == tokens == sum(len(_ids(tok, TEXTS[i])) - 1 for i in idx)
        assert g["bytes"] == nbytes
        assert g["nll"] == pytest.approx(nll, rel=1e-9)
        assert g["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
        assert g["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-12)
    # Groups add up to "all".
    parts = [got[g] for g in ("code", "mixed", "prose")]
    for key in ("tokens", "bytes", "documents"):
        assert sum(p[key] for p in parts) == got["all"][key]
    assert sum(p["nll"] for p in parts) == pytest.approx(got["all"]["nll"], rel=1e-12)


def test_bits_per_byte_counts_utf8_bytes(loaded: tuple[Any, Any]) -> None:
    lm, tok = loaded
    got = _evaluate(lm, tok, ["café ☕"])["all"]  # 3 + 2 + 1 + 3 bytes
    assert got["bytes"] == 9
    assert got["bits_per_byte"] == pytest.approx(got["nll"] / math.log(2) / 9)
    assert list(got) == ["tokens", "nll", "ppl", "bytes", "bits_per_byte", "documents"]


def test_batching_and_padding_do_not_change_results(loaded: tuple[Any, Any]) -> None:
    lm, tok = loaded
    texts = [*TEXTS, LONG, LONG[:37]]
    one = _evaluate(lm, tok, texts, batch_size=1, max_length=40)["all"]
    for bs in (2, 3, 16):
        got = _evaluate(lm, tok, texts, batch_size=bs, max_length=40)["all"]
        assert got["tokens"] == one["tokens"]
        assert got["bytes"] == one["bytes"]
        assert got["nll"] == pytest.approx(one["nll"], rel=1e-6)
    # The order of the rows does not matter either.
    rev = _evaluate(lm, tok, texts[::-1], batch_size=4, max_length=40)["all"]
    assert rev["nll"] == pytest.approx(one["nll"], rel=1e-6)


def test_plan_windows_rule() -> None:
    assert plan_windows(1, 16, 15) == []
    assert plan_windows(10, 16, 15) == [(0, 10, 1)]
    assert plan_windows(16, 16, 15) == [(0, 16, 1)]
    assert plan_windows(17, 16, 15) == [(0, 16, 1), (15, 17, 16)]
    assert plan_windows(40, 16, 15) == [(0, 16, 1), (15, 31, 16), (30, 40, 31)]
    assert plan_windows(40, 16, 8) == [(0, 16, 1), (8, 24, 16), (16, 32, 24), (24, 40, 32)]
    for n, length, stride in [(100, 16, 15), (100, 16, 5), (57, 7, 1), (33, 2, 1)]:
        scored = [p for _, e, f in plan_windows(n, length, stride) for p in range(f, e)]
        assert scored == list(range(1, n))  # every token but the first, exactly once
        for s, e, f in plan_windows(n, length, stride):
            assert e - s <= length
            assert s < f <= e
    for bad in [(10, 1, 1), (10, 16, 16), (10, 16, 0)]:
        with pytest.raises(InputError):
            plan_windows(*bad)


@pytest.mark.parametrize("stride", [None, 6])
def test_long_text_windows_match_the_rule(loaded: tuple[Any, Any], stride: int | None) -> None:
    lm, tok = loaded
    ids = _ids(tok, LONG)
    length = 16
    step = stride or length - 1
    assert len(ids) > 4 * length
    # The documented rule, independently: windows start every `step` tokens; each scores the
    # tokens that no earlier window scored.
    nll = 0.0
    count = 0
    done = 1
    start = 0
    while done < len(ids):
        window = ids[start : start + length]
        n, t = _manual_window(lm, window, done - start)
        nll += n
        count += t
        done = start + len(window)
        start += step
    got = _evaluate(lm, tok, [LONG], max_length=length, stride=stride, batch_size=3)["all"]
    assert got["tokens"] == count == len(ids) - 1
    assert got["nll"] == pytest.approx(nll, rel=1e-6)
    # More context per token (smaller stride) scores the same tokens.
    full = _evaluate(lm, tok, [LONG], max_length=1024)["all"]
    assert full["tokens"] == got["tokens"]
    assert full["nll"] != pytest.approx(got["nll"], rel=1e-9)


def test_model_directory_and_data_files(tiny: TinyModel, loaded: tuple[Any, Any], tmp_path: Path):
    lm, tok = loaded
    ref = _evaluate(lm, tok, TEXTS[:3])
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]), "utf-8")
    textdir = tmp_path / "texts"
    textdir.mkdir()
    for i, t in enumerate(TEXTS[:3]):
        (textdir / f"{i}.txt").write_text(t, "utf-8")
    for data in (jsonl, textdir):
        with quiet():
            got = evaluate_perplexity(tiny.path, data, device="cpu", progress=False)
        assert got["all"]["tokens"] == ref["all"]["tokens"]
        assert got["all"]["nll"] == pytest.approx(ref["all"]["nll"], rel=1e-6)


def test_no_eos(loaded: tuple[Any, Any]) -> None:
    lm, tok = loaded
    with_eos = _evaluate(lm, tok, [TEXTS[1]])["all"]
    without = _evaluate(lm, tok, [TEXTS[1]], append_eos=False)["all"]
    assert without["tokens"] == with_eos["tokens"] - 1
    assert without["bytes"] == with_eos["bytes"]


def test_bad_inputs_raise_typed_errors(
    tiny: TinyModel, loaded: tuple[Any, Any], tmp_path: Path
) -> None:
    lm, tok = loaded
    with pytest.raises(InputError, match="'body'"):
        _evaluate(lm, tok, datasets.Dataset.from_dict({"text": ["a"]}), text_column="body")
    with pytest.raises(InputError, match="'topic'"):
        _evaluate(lm, tok, datasets.Dataset.from_dict({"text": ["a"]}), domain_column="topic")
    with pytest.raises(InputError, match="no rows"):
        _evaluate(lm, tok, datasets.Dataset.from_dict({"text": []}))
    with pytest.raises(InputError, match="'all'"):
        _evaluate(lm, tok, datasets.Dataset.from_dict({"text": ["a"], "domain": ["all"]}))
    with pytest.raises(InputError, match="stride"):
        _evaluate(lm, tok, ["abc"], max_length=8, stride=8)
    with pytest.raises(InputError, match="batch_size"):
        _evaluate(lm, tok, ["abc"], batch_size=0)
    with pytest.raises(InputError, match="tokenizer"):
        evaluate_perplexity(lm, ["abc"], progress=False)
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="nope"):
        evaluate_perplexity(missing, ["abc"], progress=False)
    no_config = tmp_path / "empty"
    no_config.mkdir()
    with pytest.raises(InputError, match=re.escape("config.json")):
        evaluate_perplexity(no_config, ["abc"], tokenizer=tiny.path, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tiny.path, broken)
    (broken / "config.json").write_text("{not json", "utf-8")
    with pytest.raises(InputError, match="broken"), quiet():
        evaluate_perplexity(broken, ["abc"], progress=False)
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny.path, weightless)
    for f in weightless.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(InputError, match="weightless"), quiet():
        evaluate_perplexity(weightless, ["abc"], progress=False)
    with pytest.raises(InputError, match="does not exist"):
        evaluate_perplexity(tiny.path, tmp_path / "missing.jsonl", progress=False)


def test_tokenizer_beyond_the_model_vocabulary(loaded: tuple[Any, Any]) -> None:
    _, tok = loaded
    import transformers

    with quiet():
        small = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=100,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            )
        ).eval()
    with pytest.raises(InputError, match="do not match"):
        _evaluate(small, tok, ["Knowledge fusion"])


def test_run_evaluate_writes_and_resumes(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = datasets.Dataset.from_dict({"text": TEXTS, "domain": DOMAINS})
    out = tmp_path / "eval" / "perplexity.json"
    models = {"target (before)": tiny.path, "copy": tiny.path}
    with quiet():
        first = run_evaluate(models, data, out, max_length=64, progress=False)
    saved = json.loads(out.read_text("utf-8"))
    assert saved == json.loads(json.dumps(first))
    assert set(saved["models"]) == set(models)
    entry = saved["models"]["target (before)"]
    assert entry["path"] == str(tiny.path)
    assert set(entry["groups"]) == {"code", "mixed", "prose", "all"}
    assert entry["settings"]["max_length"] == 64
    assert entry["settings"]["stride"] == 63
    assert entry["groups"] == saved["models"]["copy"]["groups"]
    assert saved["data"]["rows"] == len(TEXTS)
    assert saved["data"]["domain_column"] == "domain"
    assert not list(out.parent.glob(".*"))  # no temporary file left

    calls: list[str] = []
    real = ev._evaluate

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(kw["desc"])
        return real(*args, **kw)

    monkeypatch.setattr(ev, "_evaluate", counting)
    with quiet():
        again = run_evaluate(models, data, out, max_length=64, progress=False)
    assert calls == []
    assert again["models"] == saved["models"]
    # Other settings: evaluated again; a new label is added, the others are kept.
    with quiet():
        run_evaluate({"copy": tiny.path, "third": tiny.path}, data, out, progress=False)
    assert calls == ["copy", "third"]
    saved = json.loads(out.read_text("utf-8"))
    assert set(saved["models"]) == {"target (before)", "copy", "third"}
    # Other data: previous results are replaced.
    calls.clear()
    with quiet():
        run_evaluate({"copy": tiny.path}, TEXTS[:2], out, max_length=64, progress=False)
    assert calls == ["copy"]
    assert set(json.loads(out.read_text("utf-8"))["models"]) == {"copy"}
    # A corrupt output is an error naming the file, not silently overwritten.
    out.write_text("{truncated", "utf-8")
    with pytest.raises(InputError, match=re.escape("perplexity.json")):
        run_evaluate({"copy": tiny.path}, TEXTS[:2], out, progress=False)
    with pytest.raises(InputError):
        run_evaluate({}, TEXTS[:2], out)
    with pytest.raises(FuseLLMError):
        run_evaluate({"x": 3}, TEXTS[:2], out)  # type: ignore[dict-item]


def test_parse_model_args(tmp_path: Path) -> None:
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_model_args(["fused=w/train/fused", "w/train/clm/", str(odd)]) == {
        "fused": "w/train/fused",
        "clm": "w/train/clm/",
        "a=b": str(odd),
    }
    assert parse_model_args(["target (before)=m"]) == {"target (before)": "m"}
    with pytest.raises(InputError, match="twice"):
        parse_model_args(["x/fused", "y/fused"])
    with pytest.raises(InputError):
        parse_model_args(["=dir"])


def test_cli(tiny: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusellm.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "domain": d}) + "\n" for t, d in zip(TEXTS, DOMAINS, strict=True)
        ),
        "utf-8",
    )
    out = tmp_path / "p.json"
    argv = ["evaluate", f"mine={tiny.path}", "--data", str(data), "--output", str(out)]
    with quiet():
        assert main([*argv, "--max-length", "32", "--batch-size", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text("utf-8"))
    assert printed.splitlines()[0].split()[:3] == ["model", "code", "ppl"]
    assert printed.startswith(format_table(saved))
    ppl = saved["models"]["mine"]["groups"]["all"]["ppl"]
    assert f"{ppl:.3f}" in printed
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--data", "--text-column", "--domain-column", "--max-length", "--batch-size"):
        assert option in help_text

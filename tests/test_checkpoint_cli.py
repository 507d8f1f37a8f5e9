"""Writing converted checkpoints (atomic, safetensors, model card) and the convert-gqa command line."""

import json

import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_llmopt import convert_to_gqa
from hf_llmopt.checkpoint import RECORD_FILE, save_converted
from hf_llmopt.cli import main
from tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def held_out(tmp_path):
    path = tmp_path / "held_out.jsonl"
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}. #### {2 * i + 1}"}
            for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = convert_to_gqa(tiny_model("llama"), 2)
    tokenizer = tiny_tokenizer()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(tokenizer, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_converted(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    model = convert_to_gqa(tiny_model("llama"), 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        save_converted(model, None, out)
    assert (out / "keep.txt").read_text() == "user data"
    save_converted(model, None, out, record={"x": 1}, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / RECORD_FILE).read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_convert_gqa_end_to_end(tiny_checkpoint, held_out, tmp_path, capsys):
    out = tmp_path / "converted"
    code = main(["convert-gqa", str(tiny_checkpoint), str(out), "--num-key-value-heads", "1",
                 "--eval-data", str(held_out), "--eval-tokens", "512", "--eval-seq-len", "64"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_key_value_heads"] == 1 and printed["method"] == "mean"
    assert printed["kv_cache_bytes_per_token_converted"] * 4 == printed["kv_cache_bytes_per_token_original"]
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", RECORD_FILE, "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    # the record and the card carry what this run measured
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["results"]["perplexity_converted"] == pytest.approx(printed["perplexity_converted"])
    assert record["conversion"]["source_num_key_value_heads"] == 4
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "gqa" in card.data.tags
    assert f"{printed['perplexity_converted']:.4g}" in card.text
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_key_value_heads == 1
    assert reloaded.config.hf_llmopt_gqa["method"] == "mean"


def test_cli_refuses_existing_output_before_loading(tiny_checkpoint, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    with pytest.raises(FileExistsError):
        main(["convert-gqa", str(tiny_checkpoint), str(out), "--num-key-value-heads", "1"])


def test_cli_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_cli_bad_g_is_a_clear_error(tiny_checkpoint, held_out, tmp_path):
    with pytest.raises(ValueError, match="valid values for this model: \\[1, 2, 4\\]"):
        main(["convert-gqa", str(tiny_checkpoint), str(tmp_path / "o"), "--num-key-value-heads", "3",
              "--eval-data", str(held_out), "--eval-seq-len", "64"])
    assert not (tmp_path / "o").exists()


def test_missing_model_path_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["convert-gqa", str(tmp_path / "empty"), str(tmp_path / "o"), "--num-key-value-heads", "1"])


def test_json_config_file(tiny_checkpoint, held_out, tmp_path):
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"model": str(tiny_checkpoint), "output_dir": str(tmp_path / "o"),
                               "num_key_value_heads": 2, "eval_data": str(held_out), "eval_seq_len": 64}))
    assert main(["convert-gqa", str(cfg)]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.num_key_value_heads == 2


def test_example_runs_with_its_defaults(tiny_checkpoint, held_out, tmp_path, monkeypatch):
    """examples/convert_gqa.py: MQA + the recommended method by default; flags override."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "convert_gqa.py"
    spec = importlib.util.spec_from_file_location("convert_gqa_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--model", str(tiny_checkpoint), "--output_dir", str(tmp_path / "ex"),
                            "--eval_data", str(held_out), "--eval_seq_len", "64", "--calibration_data",
                            str(held_out), "--calibration_tokens", "1024", "--calibration_seq_len", "64"])
    assert results["num_key_value_heads"] == 1 and results["method"] == "data_aware"
    assert (tmp_path / "ex" / "README.md").is_file()

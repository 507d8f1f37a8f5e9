"""Uptraining through the Trainer, on tiny converted models (tests/tiny_models.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from hf_llmopt import convert_to_gqa, get_arch_spec
from hf_llmopt.uptrain import (UptrainConfig, UptrainTrainer, add_lora, balance_attention_scales, distillation_loss,
                               merge_lora, parse_objective, resolve_lora_targets, uptrain)
from hf_llmopt.gqa.convert import get_attention, get_decoder_layers, num_heads_of
from hf_llmopt.gqa.layout import read_attention, write_attention
from hf_llmopt.uptrain.cli import parse_config
from hf_llmopt.uptrain.trainer import TokenBlockDataset

REPO = Path(__file__).resolve().parents[1]
SEQ = 32
# Settings that make a handful of Trainer steps fast and every step move the weights.
FAST = dict(seq_len=SEQ, eval_tokens=4 * SEQ, learning_rate=1e-3, warmup_steps=0, logging_steps=1, eval_steps=2,
            save_steps=2, per_device_train_batch_size=2, disable_tqdm=True, layerwise_minutes=0.02,
            layerwise_tokens=512)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices gain nothing from threads, and on a busy machine OpenMP barriers make them 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokens(n_blocks=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n_blocks, SEQ), generator=gen)


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- pure functions --------------------------------------------------------------------------------------------

def test_distillation_loss_matches_naive_reference():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.rand(2, 5) > 0.3
    temperature = 2.0
    expected = 0.0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                p = torch.softmax(teacher[b, t] / temperature, -1)
                q = torch.softmax(student[b, t] / temperature, -1)
                expected += float((p * (p.log() - q.log())).sum()) * temperature**2
    assert distillation_loss(student, teacher, temperature, mask).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(teacher, teacher, temperature).abs().item() < 1e-6


def test_objective_and_config_errors_are_clear():
    assert parse_objective("layerwise+distill") == ("layerwise", "distill")
    with pytest.raises(ValueError, match="Did you mean 'distill'"):
        parse_objective("layerwise+distil")
    with pytest.raises(ValueError, match="repeats"):
        parse_objective("distill+distill")
    with pytest.raises(ValueError, match="trainable"):
        UptrainConfig(output_dir=None, trainable="everything")
    with pytest.raises(ValueError, match="--trainable lora"):
        UptrainConfig(output_dir=None, lora_target_modules=["q_proj"])
    with pytest.raises(ValueError, match="conversion method"):
        UptrainConfig(output_dir=None, init="median")


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("objective: next_token\ntrainable: lora\nlora_target_modules: [attention]\nmax_steps: 7\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    config = parse_config([str(path), "--max_steps", "9"])
    assert (config.objective_terms, config.trainable, config.lora_target_modules) == (("next_token",), "lora",
                                                                                      ["attention"])
    assert config.max_steps == 9  # the flag overrides the file
    assert config.checkpoint_dir == str(tmp_path / "out") + ".checkpoints"
    path.write_text("objektive: distill\n")
    with pytest.raises(ValueError, match="objektive"):
        parse_config([str(path)])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gpt2"])
def test_balancing_scales_keeps_the_function_and_equalises_pairs(family):
    model = convert_to_gqa(tiny_model(family), 2)
    spec = get_arch_spec(model)
    with torch.no_grad():  # unbalance every pair as a data-aware fit can: values small, output projections large
        for layer in get_decoder_layers(model, spec):
            attention = get_attention(layer, spec)
            heads, kv = num_heads_of(model.config, spec)
            w = read_attention(attention, spec.attention, heads, kv)
            w = w.replace(v_weight=w.v_weight * 0.05, o_weight=w.o_weight * 20, k_weight=w.k_weight * 0.1,
                          q_weight=w.q_weight * 10)
            write_attention(attention, spec.attention, w, patched=getattr(attention, "hf_llmopt_patched", False))
    ids = _tokens(2)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        balance_attention_scales(model)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    attention = get_attention(get_decoder_layers(model, spec)[0], spec)
    w = read_attention(attention, spec.attention, *num_heads_of(model.config, spec))
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(w.v_weight) == pytest.approx(rms(w.o_weight), rel=1e-3)
    if spec.attention.kv_norm is None:
        assert rms(w.k_weight) == pytest.approx(rms(w.q_weight), rel=1e-3)


# --- the Trainer ------------------------------------------------------------------------------------------------

def test_distillation_loss_is_zero_when_teacher_is_the_student(tmp_path):
    student = convert_to_gqa(tiny_model("llama"), 2)
    args = UptrainConfig(output_dir=None, objective="distill", eval_strategy="no").trainer_arguments()
    trainer = UptrainTrainer(model=student, args=args, train_dataset=TokenBlockDataset(_tokens()),
                             teacher=copy.deepcopy(student), objective_terms=("distill",))
    inputs = TokenBlockDataset(_tokens(4))[0]
    batch = {k: v[None] for k, v in inputs.items()}
    assert trainer.compute_loss(student, batch).abs().item() < 1e-6
    other = UptrainTrainer(model=student, args=args, train_dataset=TokenBlockDataset(_tokens()),
                           teacher=tiny_model("llama", seed=1), objective_terms=("distill",))
    assert other.compute_loss(student, batch).item() > 1e-3  # the check above could fail


def test_layerwise_stage_alone_reduces_block_error_and_touches_only_attention(tmp_path):
    teacher = tiny_model("llama")
    student = convert_to_gqa(teacher, 1)
    before = _state(student)
    result = uptrain(student, teacher=teacher, train_data=_tokens(), objective="layerwise",
                     output_dir=str(tmp_path / "out"), **{**FAST, "layerwise_minutes": 0.05})
    m = result.metrics
    assert m["layerwise_error_after"] < 0.5 * m["layerwise_error_before"] and m["layerwise_steps"] > 0
    assert m["kl_after"] < m["kl_init"]
    after = _state(result.model)
    for name in before:
        assert torch.equal(before[name], after[name]) != (".self_attn." in name), name
    assert "steps" not in m and not (tmp_path / "out" / "training_curves.png").exists()  # no end-to-end training


@pytest.mark.parametrize("trainable", ["all", "attention"])
def test_uptrain_steps_change_every_trainable_parameter(tmp_path, trainable):
    teacher = tiny_model("llama")
    student = convert_to_gqa(teacher, 2)
    before = _state(student)
    result = uptrain(student, teacher=teacher, train_data=_tokens(), objective="next_token+distill",
                     trainable=trainable, max_steps=3, output_dir=str(tmp_path / "out"), **FAST)
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = _state(result.model)
    for name in before:
        trained = trainable == "all" or ".self_attn." in name
        assert torch.equal(before[name], after[name]) != trained, name
    assert result.metrics["steps"] == 3 and result.metrics["tokens_seen"] == 3 * 2 * SEQ
    assert {"perplexity_teacher", "perplexity_init", "perplexity_after", "kl_after"} <= set(result.metrics)


def test_final_folder_loads_natively_with_card_and_curves(tmp_path):
    teacher = tiny_model("llama")
    result = uptrain(teacher, train_data=_tokens(), num_key_value_heads=1, objective="layerwise+distill",
                     max_steps=2, output_dir=str(tmp_path / "out"), **FAST)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no leftover temporary folder
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_key_value_heads == 1
    ids = _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)
    card = (out / "README.md").read_text()
    assert "layer-wise" in card and "tokens seen" in card and f"{result.metrics['perplexity_after']:,.4g}" in card
    assert (out / "training_curves.png").stat().st_size > 1000
    record = json.loads((out / "hf_llmopt.json").read_text())
    assert record["results"]["layerwise_error_after"] < record["results"]["layerwise_error_before"]
    assert record["conversion"]["method"] == "data_aware"  # init "auto"
    with pytest.raises(FileExistsError, match="overwrite"):
        uptrain(teacher, train_data=_tokens(), num_key_value_heads=1, output_dir=str(out), **FAST)


# --- LoRA -------------------------------------------------------------------------------------------------------

def test_lora_targets_come_from_the_architecture_table_unless_overridden():
    llama = convert_to_gqa(tiny_model("llama"), 2)
    assert set(resolve_lora_targets(llama)) == set(get_arch_spec(llama).lora_target_modules)
    assert resolve_lora_targets(llama, ["attention"]) == [f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                                          for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert resolve_lora_targets(llama, ["q_proj"]) == ["q_proj"]
    gpt2 = convert_to_gqa(tiny_model("gpt2"), 2)  # patched attention: q_proj/k_proj/v_proj replace c_attn
    assert {"q_proj", "k_proj", "v_proj", "c_proj", "c_fc"} <= set(resolve_lora_targets(gpt2))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_merge_equals_unmerged(family):
    model = convert_to_gqa(tiny_model(family), 2)
    peft_model = add_lora(model, r=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a fresh adapter is an identity; make it a real change
    ids = _tokens(2)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
    merged, difference = merge_lora(peft_model, ids)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        base_logits = convert_to_gqa(tiny_model(family), 2)(input_ids=ids).logits
    assert (merged_logits - unmerged).abs().max().item() < 1e-5 and difference < 1e-5
    assert (merged_logits - base_logits).abs().max().item() > 1e-3  # the adapters did change the model


def test_uptrain_lora_trains_adapters_and_merges(tmp_path):
    teacher = tiny_model("llama")
    student = convert_to_gqa(teacher, 2)
    before = _state(student)
    result = uptrain(student, teacher=teacher, train_data=_tokens(), objective="distill", trainable="lora",
                     lora_target_modules=["attention"], max_steps=3, output_dir=str(tmp_path / "out"), **FAST)
    after = _state(result.model)
    assert set(after) == set(before)  # merged: a plain model again
    for name in before:
        is_target = ".self_attn." in name and name.endswith("proj.weight")
        assert torch.equal(before[name], after[name]) != is_target, name
    assert result.metrics["lora_merge_max_relative_difference"] < 1e-5


# --- resume and accelerate ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_resume_continues_the_step_count(tmp_path, trainable):
    teacher = tiny_model("llama")
    common = dict(teacher=teacher, train_data=_tokens(), num_key_value_heads=2, objective="next_token+distill",
                  trainable=trainable, output_dir=str(tmp_path / "out"), **FAST)
    first = uptrain(copy.deepcopy(teacher), max_steps=4, **common)
    assert (tmp_path / "out.checkpoints" / "checkpoint-4").is_dir()
    second = uptrain(copy.deepcopy(teacher), max_steps=6, resume_from_checkpoint="last", overwrite=True, **common)
    steps = [e["step"] for e in second.log_history if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-4 restored from the checkpoint, 5-6 trained now
    minutes = [e["train_minutes"] for e in second.log_history if "loss" in e]
    assert minutes == sorted(minutes) and second.metrics["steps"] == 6
    assert second.metrics["perplexity_init"] == first.metrics["perplexity_init"]  # read back for the card
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        uptrain(copy.deepcopy(teacher), max_steps=6, resume_from_checkpoint=str(tmp_path / "nope"),
                overwrite=True, **common)


def test_errors_for_missing_teacher(tmp_path):
    model = tiny_model("llama")  # not converted, no recorded source model
    with pytest.raises(ValueError, match="needs the teacher"):
        uptrain(model, train_data=_tokens(), objective="distill", output_dir=str(tmp_path / "out"), **FAST)
    # plain next-token training (LoRA too) of a model that was never converted is fine
    result = uptrain(model, train_data=_tokens(), objective="next_token", trainable="lora", max_steps=2,
                     output_dir=str(tmp_path / "lora"), **FAST)
    assert result.metrics["steps"] == 2 and "kl_after" not in result.metrics


def _tiny_checkpoint_and_jsonl(tmp_path):
    model_dir, data = tmp_path / "tiny", tmp_path / "data.jsonl"
    tiny_model("llama").save_pretrained(model_dir)
    _char_tokenizer().save_pretrained(model_dir)
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i + 1}?", "answer": f"It is {2 * i + 1}."})
                            + "\n" for i in range(80)))
    return model_dir, data


def test_cli_converts_trains_and_writes_from_a_jsonl_file(tmp_path, capsys):
    from hf_llmopt.cli import main

    model_dir, data = _tiny_checkpoint_and_jsonl(tmp_path)
    out = tmp_path / "out"
    assert main(["uptrain", "--model", str(model_dir), "--num_key_value_heads", "2", "--dataset", str(data),
                 "--objective", "next_token", "--trainable", "attention", "--max_steps", "2", "--output_dir", str(out),
                 "--train_tokens", "1024", "--seq_len", str(SEQ), "--eval_tokens", str(4 * SEQ),
                 "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.rindex("{\n"):])  # the command prints its measurements last
    assert metrics["steps"] == 2 and metrics["perplexity_teacher"] > 1
    record = json.loads((out / "hf_llmopt.json").read_text())
    assert record["results"]["steps"] == 2 and record["conversion"]["num_key_value_heads"] == 2
    assert (out / "tokenizer.json").is_file() and "next-token" in (out / "README.md").read_text()


def test_accelerate_launch_two_cpu_processes(tmp_path):
    model_dir, data = _tiny_checkpoint_and_jsonl(tmp_path)
    out = tmp_path / "out"
    # accelerate 1.15 starts several CPU processes through its torchrun path (--multi_gpu); `--cpu` alone runs one.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", str(REPO / "examples" / "uptrain_gqa.py"),
           "--model", str(model_dir), "--dataset", str(data), "--train_tokens", "2048", "--max_steps", "3",
           "--output_dir", str(out), "--objective", "layerwise+distill", "--layerwise_minutes", "0.02",
           "--layerwise_tokens", "512",
           "--seq_len", str(SEQ), "--eval_tokens", str(4 * SEQ), "--per_device_train_batch_size", "2",
           "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads((out / "history.json").read_text())
    tokens = [e["tokens_seen"] for e in history if "loss" in e]
    assert tokens == [2 * 2 * SEQ * step for step in (1, 2, 3)]  # two processes x 2 blocks per step
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 1
    assert "2 process(es)" in (out / "README.md").read_text()

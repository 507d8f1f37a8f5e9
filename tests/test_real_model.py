"""The real default model (SmolLM2-135M-Instruct): loading, caching, MQA conversion. Marked slow; runs in CI."""

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_llmopt import convert_to_gqa, load_default_model
from hf_llmopt.uptrain import uptrain
from hf_llmopt._compat import kv_cache_bytes
from hf_llmopt.data import SAMPLING_OPENERS, sample_token_blocks
from hf_llmopt.models import default_model_dir

pytestmark = pytest.mark.slow

PROSE = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "prose.txt"  # shipped with the project


@pytest.fixture(scope="module")
def default_model():
    return load_default_model()


def test_default_model_is_fp32_smollm2(default_model):
    model, tokenizer = default_model
    assert model.config.model_type == "llama"
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        30, 9, 3)
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert (default_model_dir() / "model.safetensors").is_file()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


def test_second_load_is_fast(default_model):
    start = time.perf_counter()
    model, _ = load_default_model()
    assert time.perf_counter() - start < 2.0
    assert model.config.num_key_value_heads == 3


def test_cache_location_follows_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_model_dir() == tmp_path / "hf" / "hf_llmopt" / "SmolLM2-135M-Instruct-fp32"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir() == tmp_path / "xdg" / "huggingface" / "hf_llmopt" / "SmolLM2-135M-Instruct-fp32"


def test_fresh_cache_is_built_from_the_gguf(tmp_path, monkeypatch, default_model):
    """With an empty HF_HOME the GGUF is de-quantized again and cached atomically; weights equal the first cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    model, _ = load_default_model()
    assert sorted(p.name for p in (tmp_path / "hf_llmopt").iterdir()) == ["SmolLM2-135M-Instruct-fp32"]
    reference, _ = default_model
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_real_model_to_mqa(default_model):
    model, tokenizer = default_model
    mqa = convert_to_gqa(model, 1)
    assert mqa.config.num_key_value_heads == 1 and model.config.num_key_value_heads == 3
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = kv_cache_bytes(model(input_ids=ids, use_cache=True)["past_key_values"])
        after = kv_cache_bytes(mqa(input_ids=ids, use_cache=True)["past_key_values"])
    assert after * 3 == before
    out = mqa.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    # 3 -> 3 is exact on the real model too
    same = convert_to_gqa(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(same(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_real_model_uptrain_recovers_mean_pooled_mqa(default_model, tmp_path):
    """Six distillation steps on the attention of the mean-pooled MQA model (held-out perplexity ~10,000) at least
    halve its perplexity and lower its KL (measured on the project's prose: 17,652 -> 756 and 6.24 -> 3.26 nats);
    the folder reloads natively with the trained weights."""
    model, tokenizer = default_model
    result = uptrain(convert_to_gqa(model, 1), tokenizer=tokenizer, teacher=model,
                     train_data=[PROSE.read_text(encoding="utf-8")], objective="distill", trainable="attention",
                     max_steps=6, learning_rate=1e-3, warmup_steps=0, seq_len=128, train_tokens=3072,
                     eval_tokens=512, per_device_train_batch_size=4, logging_steps=1, eval_steps=100,
                     save_strategy="no", disable_tqdm=True, output_dir=str(tmp_path / "out"))
    m = result.metrics
    assert m["steps"] == 6 and m["tokens_seen"] == 6 * 4 * 128
    assert m["perplexity_init"] > 100 * m["perplexity_teacher"]  # mean pooling: the model is unusable
    assert m["perplexity_after"] < 0.5 * m["perplexity_init"] and m["kl_after"] < 0.9 * m["kl_init"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tokenizer("Natalia sold clips to 48 of her friends", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)


def test_self_sampled_styles(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # a fresh sample cache
    model, tokenizer = default_model
    chat = sample_token_blocks(model, tokenizer, 64, 32, style="chat")
    text = sample_token_blocks(model, tokenizer, 64, 32, style="text")
    mixed = sample_token_blocks(model, tokenizer, 128, 32, style="mixed")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert chat.shape == text.shape == (2, 32) and mixed.shape == (4, 32)
    assert (chat[:, 0] == im_start).all()  # chat template
    assert not (text == im_start).any()  # plain text: an opening and its continuation
    for row in text:
        assert any(tokenizer.decode(row).startswith(opener[:20]) for opener in SAMPLING_OPENERS)
    assert torch.equal(mixed[:2], chat) and torch.equal(mixed[2:], text)  # halves of the same cached samples
    assert len(list((tmp_path / "hf_llmopt" / "samples").glob("*.pt"))) == 2
    with pytest.raises(ValueError, match="style"):
        sample_token_blocks(model, tokenizer, 64, 32, style="poem")

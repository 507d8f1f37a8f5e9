"""Text data for calibration, uptraining and evaluation: load, chat-format, pack into token blocks.

A source can be ``None`` (text sampled from the model itself: the default the project produces offline), a list of
strings, a list of records, a ``datasets.Dataset``, a path to a ``.json``/``.jsonl``/``.txt`` file, a ``datasets``
name (``"openai/gsm8k"``, with ``dataset_config``/``split``), or a ``LongTensor`` of token ids.

Records are formatted by their columns: ``messages`` (a chat) or ``question``/``answer`` (a user/assistant
exchange) go through the tokenizer's chat template where it has one; ``text`` is used as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from ._compat import chat_input_ids
from .evaluation import eval_mode

logger = logging.getLogger(__name__)

# Prompts for the self-sampled default data: instructions across everyday topics, maths, code and prose, so that
# calibration statistics cover what a chat model is used for.
SAMPLING_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "A shop sells pencils at 3 for $1. How much do 27 pencils cost? Explain step by step.",
    "Give me three tips for learning a new language.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are the main causes of the seasons on Earth?",
    "Summarize the plot of a classic adventure novel in a paragraph.",
    "Tom has 12 apples. He gives a third to Sara and eats two. How many are left? Show your work.",
    "Describe a busy market in the morning.",
    "How do vaccines train the immune system?",
    "Write a polite email asking a colleague to review a report.",
    "What is the difference between weather and climate?",
    "A train travels 180 km in 2.5 hours. What is its average speed? Explain.",
    "List the steps to bake a loaf of bread.",
    "Explain what a prime number is and give examples.",
    "Write a short poem about the sea at night.",
    "Why is the sky blue?",
    "Describe how a bill becomes a law in a parliament.",
    "A rectangle is 7 cm wide and 12 cm long. What are its area and perimeter?",
    "Give advice to someone starting their first job.",
    "Explain the water cycle.",
    "What makes a good night's sleep? Give practical advice.",
    "Write a dialogue between a customer and a librarian.",
    "Maria saves $15 a week. How many weeks until she has $240? Explain.",
    "Explain how a computer stores numbers in binary.",
    "Describe the history of the printing press in a few sentences.",
    "What should I pack for a three-day hiking trip?",
    "Explain the rules of chess briefly.",
    "If 5 workers build a wall in 8 days, how long do 10 workers take? Explain.",
    "Write a product description for a reusable water bottle.",
    "What are renewable energy sources? Compare two of them.",
    "Tell me an interesting fact about octopuses and explain it.",
)


# Openings of plain (non-chat) text for the "text" half of self-sampled data: the model continues each in its own
# words, so the statistics also cover documents fed to it as they are (prose, articles, notes), not only chat turns.
SAMPLING_OPENERS = (
    "The telescope was invented in the Netherlands in the early seventeenth century, and within a year",
    "Chapter One\n\nThe rain had not stopped for three days when",
    "In the spring of that year, the village council met to decide",
    "The human heart beats around one hundred thousand times a day,",
    "The old house at the end of the lane had been empty for",
    "Football became the most popular sport in the world because",
    "When the first railway reached the town,",
    "To cook rice on the stove, rinse it first and then",
    "The committee published its annual report on Tuesday, and",
    "My grandmother kept a notebook of everything she planted in her garden.",
    "Volcanoes form where molten rock from deep inside the Earth",
    "Minutes of the meeting held on 4 March. Present:",
    "The first computers filled entire rooms and",
    "Marie Curie was born in Warsaw in 1867. As a young woman she",
    "The city's population doubled between 1850 and 1900, largely because",
    "Dear Margaret,\n\nThank you for your letter, which arrived",
    "Bees communicate the location of flowers to one another by",
    "Travel guide: the best time to visit the northern coast is",
    "Economists have long argued about whether higher wages",
    "The expedition left the coast in early March with six wagons and",
    "How to care for a houseplant: first, find out how much light it needs.",
    "A contract is an agreement between two or more parties that",
    "The orchestra began to tune as the lights went down, and",
    "The engineer had never built anything so tall before,",
    "Winter in the northern forests is long, and the animals that live there",
    "The school board voted last night to extend the school day, a decision that",
    "Ancient sailors navigated by the stars, using",
    "He had worked at the garage for twenty years before",
    "Review: the new phone is lighter than last year's model, but",
    "Good writing is clear writing. The first rule is",
    "Glaciers move slowly, but over thousands of years they",
    "The vaccine trial enrolled four thousand volunteers, who were",
)
SAMPLING_STYLES = ("chat", "text", "mixed")
SAMPLING_TOP_P = 0.95


class DataTooShortError(ValueError):
    """The data holds fewer tokens than the computation needs."""


def format_record(record: dict, tokenizer) -> str:
    """One training/calibration text from a record (chat template where the tokenizer has one)."""
    if "messages" in record:
        messages = record["messages"]
    elif "question" in record and "answer" in record:
        messages = [{"role": "user", "content": record["question"]},
                    {"role": "assistant", "content": record["answer"]}]
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    elif "text" in record:
        return record["text"]
    else:
        raise ValueError(f"cannot format a record with columns {sorted(record)}; expected messages, "
                         "question/answer, prompt/completion or text")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


def _read_file(path: Path) -> list:
    if path.suffix == ".txt":
        return [t for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", data.get("train", []))
    raise ValueError(f"unsupported data file {path}: use .json, .jsonl or .txt")


def load_records(source: Any, dataset_config: str | None = None, split: str = "train") -> list:
    """Records (dicts or strings) from any supported source (see the module docstring)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists():
            return _read_file(path)
        if isinstance(source, str) and ("/" in source or source.isidentifier()) and not path.suffix:
            import datasets

            return list(datasets.load_dataset(source, dataset_config, split=split))
        raise FileNotFoundError(f"no data file or dataset named {source!r}")
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        return list(source)
    if isinstance(source, Iterable):
        return list(source)
    raise TypeError(f"unsupported data source of type {type(source).__name__}")


def texts_from(source: Any, tokenizer, **kwargs) -> list[str]:
    return [r if isinstance(r, str) else format_record(r, tokenizer) for r in load_records(source, **kwargs)]


def pack_token_blocks(texts: Iterable[str], tokenizer, seq_len: int, num_tokens: int | None = None,
                      min_tokens: int | None = None) -> torch.Tensor:
    """Tokenize texts, join them with EOS and cut into ``(N, seq_len)`` blocks (the last partial block dropped).

    Raises:
        DataTooShortError: fewer than ``min_tokens`` (default: one block) tokens are available.
    """
    eos = tokenizer.eos_token_id
    need = num_tokens if num_tokens is not None else None
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need + seq_len:
            break
    n_blocks = len(ids) // seq_len
    if need is not None:
        n_blocks = min(n_blocks, max(1, -(-need // seq_len)))
    minimum = min_tokens if min_tokens is not None else seq_len
    if n_blocks * seq_len < minimum or n_blocks == 0:
        raise DataTooShortError(
            f"the data gives {len(ids)} tokens, fewer than the {max(minimum, seq_len)} needed "
            f"(blocks of {seq_len}); pass more text"
        )
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def sampling_pad_token_id(tokenizer) -> int | None:
    """The token that pads self-sampled blocks after the reply: the tokenizer's pad token, else its EOS."""
    if tokenizer is None:
        return None
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def query_positions(blocks: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """``(N, T)`` float mask of the positions whose statistics count: all but trailing padding.

    Self-sampled blocks end with padding after a short reply; the first token of that run is kept (with
    ``pad == eos`` it is the model's own end of turn).
    """
    mask = torch.ones(blocks.shape, dtype=torch.float32)
    if pad_token_id is None:
        return mask
    is_pad = blocks == pad_token_id
    trailing = is_pad.flip(-1).cumprod(-1).flip(-1).bool()  # pad from here to the end
    run_start = trailing & ~torch.cat([torch.zeros_like(trailing[:, :1]), trailing[:, :-1]], dim=1)
    mask[trailing & ~run_start] = 0.0
    return mask


def pack_samples(blocks: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Join self-sampled blocks without their trailing padding and cut them again into blocks of the same length.

    The first token of each trailing padding run is kept (with ``pad == eos`` it is the sample's own end of turn);
    the last partial block is dropped. Packed, samples start anywhere in a block, as texts packed by
    :func:`pack_token_blocks` do, instead of every block opening with the same chat-template header at position 0:
    layer-wise calibration on packed samples transfers better to other text (SmolLM2 at 3 -> 1 KV heads after 10
    minutes: 2.18x / 2.38x of the original chat / prose perplexity, against 2.26x / 2.62x unpacked).
    """
    if pad_token_id is None:
        return blocks
    ids = blocks[query_positions(blocks, pad_token_id).bool()]
    seq_len = blocks.shape[1]
    n_blocks = ids.numel() // seq_len
    return ids[: n_blocks * seq_len].view(n_blocks, seq_len)


def _sample_cache_path(model, num_tokens: int, seq_len: int, seed: int, style: str = "chat") -> Path:
    from .models import cache_root

    first = next(model.parameters())
    key = json.dumps([getattr(model.config, "_name_or_path", ""), model.config.to_diff_dict() if hasattr(
        model.config, "to_diff_dict") else {}, float(first.detach().float().sum()), num_tokens, seq_len, seed]
        + ([] if style == "chat" else [style]),
        sort_keys=True, default=str)
    return cache_root() / "samples" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".pt")


@torch.no_grad()
def sample_token_blocks(model, tokenizer, num_tokens: int, seq_len: int, seed: int = 0, batch_size: int = 16,
                        cache: bool = True, style: str = "chat") -> torch.Tensor:
    """``(N, seq_len)`` token blocks of text sampled from ``model`` itself.

    This is the default calibration/training data: it needs no dataset and follows the model's own distribution.
    ``style="chat"``: a prompt from :data:`SAMPLING_PROMPTS` in the chat template and the sampled reply;
    ``"text"``: an opening from :data:`SAMPLING_OPENERS` as plain text and its sampled continuation; ``"mixed"``:
    half of each (chat blocks first). Results are cached under ``$HF_HOME/hf_llmopt/samples`` keyed by the model and
    the arguments.
    """
    if style not in SAMPLING_STYLES:
        raise ValueError(f"style={style!r} is not one of {SAMPLING_STYLES}")
    if style == "mixed":
        half = max(1, -(-num_tokens // seq_len) // 2) * seq_len
        return torch.cat([sample_token_blocks(model, tokenizer, half, seq_len, seed, batch_size, cache, "chat"),
                          sample_token_blocks(model, tokenizer, max(seq_len, num_tokens - half), seq_len, seed,
                                              batch_size, cache, "text")])
    path = _sample_cache_path(model, num_tokens, seq_len, seed, style)
    if cache and path.is_file():
        return torch.load(path)
    from tqdm.auto import tqdm

    n_blocks = max(1, -(-num_tokens // seq_len))
    gen = torch.Generator().manual_seed(seed)
    pad = sampling_pad_token_id(tokenizer)
    blocks = []
    progress = tqdm(total=n_blocks, desc="Sampling text from the model", unit="seq")
    torch.manual_seed(seed)
    with eval_mode(model):
        while len(blocks) < n_blocks:
            size = min(batch_size, n_blocks - len(blocks))
            pool = SAMPLING_PROMPTS if style == "chat" else SAMPLING_OPENERS
            prompts = [pool[int(i)] for i in torch.randint(len(pool), (size,), generator=gen)]
            if style == "chat" and getattr(tokenizer, "chat_template", None):
                prompt_ids = [chat_input_ids(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
                              for p in prompts]
            else:
                prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
            width = max(len(p) for p in prompt_ids)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                                 top_p=SAMPLING_TOP_P, max_new_tokens=max(1, seq_len - min(len(p) for p in prompt_ids)),
                                 min_new_tokens=1, pad_token_id=pad)
            for row, p in zip(out, prompt_ids):
                tokens = row[width - len(p):].tolist()  # drop left padding, keep prompt + reply (+ any pad after EOS)
                tokens = (tokens + [pad] * seq_len)[:seq_len]
                blocks.append(tokens)
                progress.update()
                if len(blocks) == n_blocks:
                    break
    progress.close()
    result = torch.tensor(blocks, dtype=torch.long)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(result, tmp)
        os.replace(tmp, path)
    return result


def token_blocks(source: Any, tokenizer, model=None, num_tokens: int = 12288, seq_len: int = 256, seed: int = 0,
                 min_tokens: int | None = None, **load_kwargs) -> torch.Tensor:
    """``(N, seq_len)`` LongTensor from any source; ``None`` samples from ``model``.

    Raises:
        DataTooShortError: the source holds fewer than ``min_tokens`` tokens.
    """
    if source is None:
        if model is None or tokenizer is None:
            raise ValueError("the default data is sampled from the model: pass model= and tokenizer=")
        return sample_token_blocks(model, tokenizer, num_tokens, seq_len, seed=seed)
    if isinstance(source, torch.Tensor):
        ids = source.long()
        if ids.dim() == 1:
            ids = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)
        if min_tokens is not None and ids.numel() < min_tokens or ids.numel() == 0:
            raise DataTooShortError(f"the token tensor holds {ids.numel()} tokens, fewer than the {min_tokens} needed")
        return ids
    if tokenizer is None:
        raise ValueError("text data needs a tokenizer: pass tokenizer=")
    return pack_token_blocks(texts_from(source, tokenizer, **load_kwargs), tokenizer, seq_len, num_tokens,
                             min_tokens=min_tokens)

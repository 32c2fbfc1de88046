"""Build a small random LLaMA model on disk, with no network: the model every test and benchmark uses.

Owns: a deterministic generated corpus (ASCII words, accented words, CJK, emoji, so that byte-level BPE produces
tokens that split UTF-8 characters and incremental detokenization is exercised), a byte-level BPE tokenizer
trained on it with the `tokenizers` library, a ChatML chat template, seeded random weights, and a
`generation_config.json` whose end-of-sequence ids are ``<|im_end|>`` and ``<|endoftext|>``. Everything is
written with `save_pretrained`, so `AutoTokenizer.from_pretrained(dir)` and `AutoModelForCausalLM.from_pretrained(dir)`
load it through the real code paths.

With `portable`, the tokenizer's config is written the way transformers 4.x writes it too (its class named
`PreTrainedTokenizerFast`, the chat template inline), so one folder loads in transformers 4.x and 5.x alike: the
mixed-fleet tests serve it with FastChat 0.2.36, which needs transformers 4.x, and with lmfleet.

Does not own: anything about serving. Nothing is cached between calls; the same (size, seed) always gives the
same files.

    lmfleet make-test-model DIR --size tiny|small --seed N [--portable]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class _Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    corpus_lines: int
    initializer_range: float


SIZES: dict[str, _Shape] = {
    # For tests: loads and runs in milliseconds. A wide initializer makes logits far apart, so greedy choices
    # are robust to the last-bit differences between batched and unbatched matmuls.
    "tiny": _Shape(1024, 64, 128, 2, 4, 2, 512, corpus_lines=1500, initializer_range=0.2),
    # The benchmark shape: SmolLM2-135M-like.
    "small": _Shape(16384, 576, 1536, 30, 9, 3, 2048, corpus_lines=40000, initializer_range=0.02),
}

_ACCENTED = tuple(
    "café naïve façade résumé über straße niño señor crème brûlée déjà vu jalapeño coöperate São Paulo Zürich "
    "Ångström Dvořák Łódź smörgåsbord piñata ελληνικά русский язык עברית العربية हिन्दी".split()
)
_EMOJI = ("😀", "🚀", "🎉", "👍", "🐍", "🔥", "🌍", "❤️", "👩‍💻", "🇫🇷", "🤖", "✨")
_ONSETS = ("", *"b c d f g h j k l m n p r s t v w z br ch cl dr fl gr pl pr sh st str th tr".split())
_NUCLEI = tuple("a e i o u ai ea ee io oo ou y".split())
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "rk", "st", "x")


def _corpus(lines: int, seed: int) -> Iterator[str]:
    """Deterministic text: pseudo-words (plenty of distinct pairs so a 16k vocabulary fills), numbers,
    punctuation, accented words, CJK and emoji."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(rng.randint(1, 4)))
        for _ in range(max(200, lines))
    ]
    for _ in range(lines):
        parts: list[str] = []
        for _ in range(rng.randint(6, 24)):
            r = rng.random()
            if r < 0.70:
                w = rng.choice(words)
                parts.append(w.capitalize() if rng.random() < 0.1 else w)
            elif r < 0.80:
                parts.append(rng.choice(_ACCENTED))
            elif r < 0.88:
                parts.append("".join(chr(0x4E00 + rng.randrange(0x600)) for _ in range(rng.randint(1, 4))))
            elif r < 0.93:
                parts.append(rng.choice(_EMOJI))
            elif r < 0.97:
                parts.append(str(rng.randrange(10_000)))
            else:
                parts.append(rng.choice((",", ".", "!", "?", ":", ";", "-", "(", ")", '"')))
        yield " ".join(parts) + "\n"


def _train_tokenizer(shape: _Shape, seed: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(shape.corpus_lines, seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        unk_token=None,
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=shape.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def make_test_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, *, portable: bool = False) -> Path:
    """Write a random LLaMA model and its tokenizer to `out_dir` (created if needed); return the directory. With
    `portable`, a tokenizer config transformers 4.x reads too."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    shape = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(shape, seed)
    vocab_size = len(tokenizer)  # the model can only sample ids the tokenizer can decode
    endoftext, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        initializer_range=shape.initializer_range,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG state
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext, bos_token_id=None
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if portable:
        _portable_tokenizer_config(out)
    return out


def _portable_tokenizer_config(out: Path) -> None:
    """Rewrite the tokenizer config transformers 5 wrote (class `TokenizersBackend`, which transformers 4 cannot
    load; the chat template in its own file) in the form both read."""
    config_path, template_path = out / "tokenizer_config.json", out / "chat_template.jinja"
    config = json.loads(config_path.read_text())
    portable = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length")},
        "additional_special_tokens": ["<|im_start|>"],
        "clean_up_tokenization_spaces": False,
        "chat_template": template_path.read_text() if template_path.exists() else CHAT_TEMPLATE,
    }
    config_path.write_text(json.dumps(portable, indent=2) + "\n")
    template_path.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmfleet make-test-model", description="Build a small random LLaMA model and its tokenizer in DIR."
    )
    parser.add_argument("dir", help="directory to write the model into")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--portable", action="store_true", help="a tokenizer config transformers 4.x reads too")
    args = parser.parse_args(argv)
    path = make_test_model(args.dir, size=args.size, seed=args.seed, portable=args.portable)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

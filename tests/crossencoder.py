"""A tiny cross-encoder on disk, with no network: no real one installs offline, so the rerank tests build their own.

A BERT-style `BertForSequenceClassification` with one label (random weights from a seed; the classifier head drawn
wide, so scores spread over the sigmoid instead of all sitting near 0.5), and a WordPiece tokenizer over a small
English vocabulary with letter pieces, so any lowercase text tokenizes and pairs carry segment ids as BERT's do.
Saved two ways, both of which sentence-transformers 6 loads as a `CrossEncoder`:

  * "st": through `CrossEncoder.save` itself: `modules.json`, `config_sentence_transformers.json` with
    `"model_type": "CrossEncoder"` and its activation (a sigmoid by default), `sentence_bert_config.json`;
  * "config": the older layout (sentence-transformers 4 and 5, the ms-marco rerankers on the hub): a plain
    transformers folder whose `config.json` carries `"sentence_transformers": {"activation_fn": ...}`.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

WORDS = (
    "a an the is are was of in on to and or for with what who where how why which capital city country france "
    "paris germany berlin italy rome spain madrid cat cats dog dogs kitten pet pets animal animals food bread "
    "bake baking recipe home homemade oven flour stock market fell sharply tuesday money bank river water sky "
    "blue sun rain weather today tomorrow people live population museum museums music violin drums play plays "
    "playing man woman girl boy child eating eat car cars road drive fast slow computer python code program "
    "language model models search query document documents relevant answer question"
).split()


def _tokenizer(max_length: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = [*specials, *pieces, *(f"##{p}" for p in pieces), *WORDS]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def make_cross_encoder(out: Path, *, seed: int = 0, layout: str = "st", activation: str | None = None) -> Path:
    """Write the tiny cross-encoder to `out` in `layout` ("st" or "config"); `activation`: the dotted name of a
    torch activation to save with it (None: the default, a sigmoid). Returns `out`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    max_length = 128
    tokenizer = _tokenizer(max_length)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_length,
        num_labels=1,
        initializer_range=0.2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG state
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config).eval()
        torch.nn.init.normal_(model.classifier.weight, std=0.5)  # a wide head: scores spread out
    out.mkdir(parents=True, exist_ok=True)
    if layout == "config":
        if activation is not None:
            model.config.sentence_transformers = {"activation_fn": activation, "version": "4.0.1"}
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out
    if layout != "st":
        raise ValueError(f"unknown layout {layout!r}")
    from sentence_transformers import CrossEncoder

    staging = out / ".plain"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    encoder = CrossEncoder(str(staging), device="cpu")
    encoder.save(str(out))
    if activation is not None:
        st = json.loads((out / "config_sentence_transformers.json").read_text())
        (out / "config_sentence_transformers.json").write_text(json.dumps({**st, "activation_fn": activation}))
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    return out

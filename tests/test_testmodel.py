"""The generated test model loads through the real Auto classes and its tokenizer round-trips multi-byte text."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmfleet.testmodel import SPECIAL_TOKENS, main, make_test_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_test_model(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


def test_loads_through_auto_classes(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings
    for t in SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
    eos = set(model.generation_config.eos_token_id)
    assert eos == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    ids = torch.tensor([tok.encode("hello world")])
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_chat_template(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


@pytest.mark.parametrize(
    "text",
    ["café naïve straße", "你好，世界", "rocket 🚀 and 👩‍💻 coder", "mixed: Zürich 東京 🎉 done\n", "plain ascii"],
)
def test_round_trip_multibyte(model_dir, text):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_some_tokens_split_utf8_characters(model_dir):
    """Incremental detokenization must be exercised: some single tokens are not valid UTF-8 on their own."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode("鬼 龜 🐙 🦑", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_deterministic(tmp_path):
    a = make_test_model(tmp_path / "a", size="tiny", seed=3)
    b = make_test_model(tmp_path / "b", size="tiny", seed=3)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "m"), "--size", "tiny", "--seed", "1"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["hidden_size"] == 64
    assert str(tmp_path / "m") in capsys.readouterr().out

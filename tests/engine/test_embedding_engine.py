"""The embedding engine on the real all-MiniLM-L6-v2: the pooling its folder prescribes, vectors equal to
sentence-transformers' own, padding that changes nothing; and how the engine is chosen."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmfleet.engine import embedding, registry
from lmfleet.engine.base import EmbeddingEngine, LoadedModel
from lmfleet.engine.embedding import config

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, a masterpiece of the year, and everybody who has seen it loves it.",
    "hi",
    "Ünïcödé text with émojis 🙂 also works.",
]


@pytest.fixture(scope="module")
def loaded(minilm: Path) -> LoadedModel:
    source = registry.locate(str(minilm))
    entry = registry.choose(source)
    return registry.load(source, entry, embedding.EmbeddingSettings())


def cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


def test_auto_picks_the_embedding_engine_for_a_sentence_transformers_folder(minilm: Path, tmp_path: Path) -> None:
    source = registry.locate(str(minilm))
    assert source.kind == "st-folder"
    assert registry.choose(source).name == "embedding"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert registry.choose(registry.locate(str(plain))).name == "transformers"
    assert registry.choose(registry.locate(str(plain)), "embedding").name == "embedding"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(registry.ModelError, match="embedding engine reads Hugging Face folders"):
        registry.choose(registry.locate(str(gguf)), "embedding")


def test_the_folder_says_mean_pooling_normalized_and_256_tokens(minilm: Path, loaded: LoadedModel) -> None:
    assert config.pooling_of(minilm) == config.Pooling("mean", normalize=True, max_seq_length=256)
    engine = loaded.engine
    assert isinstance(engine, EmbeddingEngine)
    assert (engine.dimensions, engine.max_model_len, engine.matryoshka_dimensions) == (384, 256, None)
    assert loaded.engine_name == "embedding"


def _st_folder(root: Path, modules: list[str], pooling: dict[str, bool] | None = None) -> Path:
    root.mkdir()
    (root / "modules.json").write_text(
        json.dumps(
            [
                {"idx": i, "path": f"{i}_{m}" if i else "", "type": f"sentence_transformers.models.{m}"}
                for i, m in enumerate(modules)
            ]
        )
    )
    if pooling is not None:
        (root / "1_Pooling").mkdir()
        (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return root


def test_pooling_configs_read_or_refused(tmp_path: Path) -> None:
    cls = _st_folder(tmp_path / "cls", ["Transformer", "Pooling"], {"pooling_mode_cls_token": True})
    assert config.pooling_of(cls) == config.Pooling("cls", normalize=False)
    assert config.pooling_of(tmp_path) == config.Pooling()  # no modules.json: mean + L2
    dense = _st_folder(tmp_path / "dense", ["Transformer", "Pooling", "Dense"], {"pooling_mode_mean_tokens": True})
    with pytest.raises(config.PoolingConfigError, match="Dense"):
        config.pooling_of(dense)
    weighted = _st_folder(tmp_path / "w", ["Transformer", "Pooling"], {"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(config.PoolingConfigError, match="weightedmean"):
        config.pooling_of(weighted)


def test_matryoshka_from_the_config_or_the_operator() -> None:
    assert config.matryoshka_of({}, False) is None
    assert config.matryoshka_of({}, True) == ()
    assert config.matryoshka_of({"is_matryoshka": True}, False) == ()
    assert config.matryoshka_of({"matryoshka_dimensions": [768, 64, 256]}, False) == (64, 256, 768)


def test_vectors_match_sentence_transformers_in_one_padded_batch(
    minilm: Path, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(minilm), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    engine = loaded.engine
    assert isinstance(engine, EmbeddingEngine)
    ids = [loaded.tokenizer.encode(s) for s in SENTENCES]
    assert len({len(i) for i in ids}) > 1, "the batch is padded"
    batch = engine.embed(ids)
    for mine, theirs in zip(batch, expected, strict=True):
        assert len(mine) == 384
        assert cosine(mine, theirs.tolist()) >= 0.9999
        assert abs(math.fsum(x * x for x in mine) - 1) < 1e-5  # L2-normalized, as the Normalize module says
    for alone, seq in zip(batch, ids, strict=True):  # padding beside a sequence changes nothing
        assert cosine(engine.embed([seq])[0], alone) >= 0.99999

"""Cross-encoders on the embedding engine: which folders are one, how they score as sentence-transformers reads
them, and scores equal to sentence-transformers' own `CrossEncoder` on the same folder (a tiny random one: no real
cross-encoder installs offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmfleet.engine import embedding, registry
from lmfleet.engine.base import LoadedModel, PairTokenizer, ScoringEngine
from lmfleet.engine.embedding import config as folder_config
from tests.crossencoder import make_cross_encoder

PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("What is the capital of France?", "The cat eats bread at home."),
    ("how do I bake bread", "A simple recipe for homemade bread: flour, water, an oven."),
    ("dogs", "Berlin has many museums."),
    ("Ünïcödé and émoji 🙂", "x"),
]
IDENTITY = "torch.nn.modules.linear.Identity"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross-encoders")
    return {
        "st": make_cross_encoder(root / "st", seed=0),
        "config": make_cross_encoder(root / "config", seed=1, layout="config", activation=IDENTITY),
    }


def load(folder: Path) -> LoadedModel:
    source = registry.locate(str(folder))
    return registry.load(source, registry.choose(source), embedding.EmbeddingSettings(max_num_seqs=3))


def test_auto_serves_a_cross_encoder_on_the_embedding_engine(folders: dict[str, Path], tmp_path: Path) -> None:
    for folder in folders.values():
        source = registry.locate(str(folder))
        assert folder_config.is_cross_encoder(folder) and registry.choose(source).name == "embedding"
    reranker = tmp_path / "bge-like"  # a one-label classifier with no sentence-transformers config
    reranker.mkdir()
    config = {"architectures": ["XLMRobertaForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    (reranker / "config.json").write_text(json.dumps(config))
    assert (
        folder_config.is_cross_encoder(reranker) and registry.choose(registry.locate(str(reranker))).name == "embedding"
    )
    sentiment = tmp_path / "sentiment"  # a classifier into two labels is not a reranker
    sentiment.mkdir()
    (sentiment / "config.json").write_text(json.dumps({**config, "id2label": {"0": "NEG", "1": "POS"}}))
    assert not folder_config.is_cross_encoder(sentiment)
    assert registry.choose(registry.locate(str(sentiment))).name == "transformers"


def test_the_activation_is_read_as_sentence_transformers_reads_it(folders: dict[str, Path], tmp_path: Path) -> None:
    assert folder_config.scoring_of(folders["st"]) == folder_config.Scoring("sigmoid")
    assert folder_config.scoring_of(folders["config"]) == folder_config.Scoring("identity")
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"sbert_ce_default_activation_function": IDENTITY}))
    assert folder_config.scoring_of(old).activation == "identity"
    custom = tmp_path / "custom"  # not torch's: sentence-transformers falls back to its default without remote code
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"sentence_transformers": {"activation_fn": "mylib.Act"}}))
    assert folder_config.scoring_of(custom).activation == "sigmoid"
    (custom / "config.json").write_text(json.dumps({"sentence_transformers": {"activation_fn": "torch.nn.ReLU"}}))
    with pytest.raises(folder_config.PoolingConfigError, match="ReLU"):
        folder_config.scoring_of(custom)


def test_pipelines_it_does_not_run_are_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    extra = tmp_path / "dense"
    extra.mkdir()
    for f in folders["st"].iterdir():
        (extra / f.name).write_bytes(f.read_bytes())
    modules = json.loads((extra / "modules.json").read_text())
    (extra / "modules.json").write_text(json.dumps([*modules, {"idx": 1, "path": "1_Dense", "type": "x.Dense"}]))
    with pytest.raises(folder_config.PoolingConfigError, match="Dense"):
        folder_config.scoring_of(extra)
    (extra / "modules.json").write_text(json.dumps(modules))
    st = json.loads((extra / "config_sentence_transformers.json").read_text())
    st.update(prompts={"query": "query: "}, default_prompt_name="query")
    (extra / "config_sentence_transformers.json").write_text(json.dumps(st))
    with pytest.raises(folder_config.PoolingConfigError, match="prompt"):
        folder_config.scoring_of(extra)


@pytest.mark.parametrize("layout", ["st", "config"])
def test_scores_equal_sentence_transformers(
    folders: dict[str, Path], layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import CrossEncoder

    folder = folders[layout]
    expected = CrossEncoder(str(folder), device="cpu").predict(PAIRS, batch_size=2).tolist()
    loaded = load(folder)
    engine, tokenizer = loaded.engine, loaded.tokenizer
    assert isinstance(engine, ScoringEngine) and isinstance(tokenizer, PairTokenizer)
    assert engine.max_model_len == 128 and loaded.engine_name == "embedding"
    pairs = [tokenizer.encode_pair(a, b) for a, b in PAIRS]
    assert all(p.segments[0] == 0 and p.segments[-1] == 1 for p in pairs), "BERT's segment ids: query 0, document 1"
    assert len({len(p.ids) for p in pairs}) > 1, "the batch is padded"
    batch = engine.score(pairs[:3]) + engine.score(pairs[3:])
    assert batch == pytest.approx(expected, abs=1e-5)  # float32, other batch compositions than theirs
    alone = [engine.score([p])[0] for p in pairs]
    assert alone == pytest.approx(batch, abs=1e-5)
    if layout == "st":
        assert all(0 < s < 1 for s in batch), "a sigmoid"
    else:
        assert any(not 0 < s < 1 for s in batch), "the identity: raw logits"

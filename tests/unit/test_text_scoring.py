"""Text scorers, the evaluator suite and the evaluator resource."""

from __future__ import annotations

import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from emotion_assets.science.scoring import (
    MARKER_COLUMN,
    EmbeddingEmotionClassifier,
    EvaluatorSuite,
    EvaluatorUnavailable,
    MiniLmEmbedder,
    NrcLexiconEmotions,
    PolitenessScorer,
    TransformerClassifier,
    VaderSentiment,
    binary_auroc,
    build_suite,
    classification_quality,
)
from resources import evaluators
from tests.tiny_models import SPECIAL, byte_tokenizer

MISSING_ID = "no-such-org/definitely-not-a-cached-model"
TEXTS = [
    "I love it.",
    "This is a much longer sentence about nothing in particular at all.",
    "",
    "Why?",
    "ok ok",
]


def _tiny_classifier(path, problem_type: str | None = None, num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    labels = ["Very Happy", "sad", "Neutral"][:num_labels]
    cfg = BertConfig(
        vocab_size=len(SPECIAL) + 256,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=0,
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
        problem_type=problem_type,
    )
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    byte_tokenizer(add_bos=False, padding_side="right").save_pretrained(path)
    return model


def test_vader_separates_positive_and_negative():
    scores = VaderSentiment().score(
        ["I love this, it is wonderful and amazing!", "I hate this, it is awful."]
    )
    assert list(scores.columns) == ["sentiment_compound", "sentiment_pos", "sentiment_neg", "sentiment_neu"]
    assert scores.loc[0, "sentiment_compound"] > 0.5 > -0.5 > scores.loc[1, "sentiment_compound"]
    assert scores.loc[0, "sentiment_pos"] > scores.loc[0, "sentiment_neg"]
    assert not scores.isna().any().any()


def test_nrc_finds_anger_and_nothing_in_neutral_text():
    nrc = NrcLexiconEmotions()
    scores = nrc.score(
        ["I am furious, full of rage, and I hated every minute.", "The table is in the room.", ""]
    )
    assert scores.loc[0, "nrc_anger"] > 0.2
    assert scores.loc[1].sum() == 0.0
    assert scores.loc[2].sum() == 0.0
    assert ((scores >= 0) & (scores <= 1)).all().all()
    assert "anger" in nrc.affects("hated")  # -ed fallback to "hate"


def test_politeness_ranks_polite_request_above_command():
    scorer = PolitenessScorer()
    polite = "Could you please help me, if it's not too much trouble? Thank you so much."
    scores = scorer.score([polite, "Give me the file now.", ""])
    assert scores.loc[0, "politeness"] > 0.8 > 0.5 > scores.loc[1, "politeness"]
    assert scores.loc[2, "politeness"] == pytest.approx(0.5)
    lo, hi = scorer.metric_ranges["politeness_raw"]
    assert lo <= scores["politeness_raw"].min() <= scores["politeness_raw"].max() <= hi


KEYWORD_FREE = [
    "Give me the file now.",
    "Could you send the report when you have a moment?",
    "Why is the door open?",
    "You left the lights on. Turn them off.",
    "Perhaps we could meet on Tuesday, if you don't mind.",
    "The meeting starts at noon.",
]
KEYWORDS = ["thanks", "thank you", "sorry", "apologies", "grateful", "gratitude", "forgive me", "excuse me",
            "appreciated", "regret"]  # fmt: skip


def _insertions(sentence: str, keyword: str) -> list[str]:
    """``keyword`` alone added to ``sentence``: as its own opening clause or sentence, after the first word,
    at the end, and as a closing sentence."""
    first, _, rest = sentence.partition(" ")
    opening = keyword.capitalize()
    return [
        f"{opening}, {sentence}", f"{opening}. {sentence}", f"{first} {keyword} {rest}",
        f"{sentence} {keyword}", f"{sentence} {opening}!",
    ]  # fmt: skip


def test_politeness_ignores_gratitude_and_apology_keywords_and_the_marker_sees_them():
    scorer = PolitenessScorer()
    base = scorer.score(KEYWORD_FREE)
    assert (base[MARKER_COLUMN] == 0.0).all()
    for keyword in KEYWORDS:
        for i, sentence in enumerate(KEYWORD_FREE):
            added = scorer.score(_insertions(sentence, keyword))
            assert added["politeness"].tolist() == [base.loc[i, "politeness"]] * 5, (keyword, sentence)
            assert added["politeness_raw"].tolist() == [base.loc[i, "politeness_raw"]] * 5
            assert (added[MARKER_COLUMN] == 1.0).all(), (keyword, sentence)
    # A real cue still moves politeness: the keyword filter does not blind the scorer.
    assert scorer.score(["Please give me the file now."]).loc[0, "politeness"] > base.loc[0, "politeness"]
    assert scorer.metric_ranges["politeness_raw"] == pytest.approx((-4.1, 4.7))
    assert "gratitude" not in scorer.features_frame(["thanks"]).columns


def test_politeness_auroc_documented_in_the_scorer_is_the_measured_one():
    # The frozen cues' AUROC on the baseline profile's eval fitting prompts, polite vs direct register.
    from emotion_assets.profiles import load_profiles
    from emotion_assets.science.prompts import assign_splits, fitting_mask, load_prompts

    profile = load_profiles()["baseline"]
    frame = load_prompts(
        profile.dataset.resolved_path(), max_imbalance_ratio=profile.dataset.max_imbalance_ratio
    )
    frame = assign_splits(frame, eval_fraction=profile.dataset.eval_fraction, seed=profile.seed)
    evaluation = frame[(frame["split"] == "eval").to_numpy() & fitting_mask(frame)].reset_index(drop=True)
    scores = PolitenessScorer().score(evaluation["text"].tolist())
    polite, direct = evaluation["register"] == "polite", evaluation["register"] == "direct"
    auroc = binary_auroc(scores.loc[polite, "politeness"], scores.loc[direct, "politeness"])
    marker = binary_auroc(scores.loc[polite, MARKER_COLUMN], scores.loc[direct, MARKER_COLUMN])
    assert (int(polite.sum()), int(direct.sum())) == (73, 76)
    assert round(auroc, 2) == 0.67 and round(marker, 2) == 0.50
    assert "= 0.67 (73 vs 76 prompts" in PolitenessScorer.__doc__


def test_transformer_single_label_softmax_and_batch_invariance(tmp_path):
    _tiny_classifier(tmp_path)
    clf = TransformerClassifier(str(tmp_path), device="cpu", batch_size=2, prefix="t_")
    assert clf.metric_names == ["t_very_happy", "t_sad", "t_neutral"]
    scores = clf.score(TEXTS)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)
    one_by_one = pd.concat([clf.score([t]) for t in TEXTS], ignore_index=True)
    np.testing.assert_allclose(scores.to_numpy(), one_by_one.to_numpy(), atol=1e-5)


def test_transformer_multi_label_uses_sigmoid(tmp_path):
    model = _tiny_classifier(tmp_path, problem_type="multi_label_classification", seed=1)
    clf = TransformerClassifier(str(tmp_path), device="cpu", batch_size=4)
    scores = clf.score(TEXTS).to_numpy()
    tok = AutoTokenizer.from_pretrained(tmp_path)  # byte_tokenizer() vocab order differs per call
    with torch.inference_mode():
        expected = np.stack(
            [
                torch.sigmoid(model(**tok([t or tok.unk_token], return_tensors="pt")).logits)[0].numpy()
                for t in TEXTS
            ]
        )
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert not np.allclose(scores.sum(axis=1), 1.0)


def test_missing_transformer_raises_unavailable_with_id():
    with pytest.raises(EvaluatorUnavailable, match="definitely-not-a-cached-model") as err:
        TransformerClassifier(MISSING_ID, device="cpu", batch_size=4)
    assert "huggingface-cli download" in str(err.value)


def _fake_embed(texts: list[str]) -> np.ndarray:
    centres = {"thank": 0, "furious": 1, "sorry": 2}
    out = []
    for t in texts:
        rng = np.random.default_rng(zlib.crc32(t.encode()))
        k = next((v for w, v in centres.items() if w in t), 3)
        vec = rng.normal(scale=0.1, size=8)
        vec[k] += 3.0
        out.append(vec)
    return np.array(out)


def _labelled(n: int) -> tuple[list[str], list[str]]:
    kinds = [("thank", "gratitude"), ("furious", "anger"), ("sorry", "apology"), ("table", "neutral")]
    texts = [f"{w} example {i}" for i in range(n) for w, _ in kinds]
    labels = [lab for _ in range(n) for _, lab in kinds]
    return texts, labels


def test_embedding_classifier_separates_clusters():
    train_texts, train_labels = _labelled(6)
    clf = EmbeddingEmotionClassifier(_fake_embed).fit(train_texts, train_labels, seed=0)
    test_texts, test_labels = _labelled(3)
    test_texts = [t + " held out" for t in test_texts]
    scores = clf.score(test_texts)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-9)
    quality = classification_quality(test_labels, scores, {lab: f"emotion_{lab}" for lab in clf.classes})
    assert quality["accuracy"] == 1.0
    assert quality["macro_f1"] == 1.0
    assert all(v == 1.0 for v in quality["auroc"].values())
    assert np.trace(np.array(quality["confusion_matrix"])) == len(test_labels)


def test_embedding_classifier_needs_two_examples_per_class():
    with pytest.raises(ValueError, match="at least 2 classes"):
        EmbeddingEmotionClassifier(_fake_embed).fit(["thank a", "thank b", "sorry"], ["g", "g", "a"], seed=0)


def test_binary_auroc():
    assert binary_auroc([3, 4], [1, 2]) == 1.0
    assert binary_auroc([1, 2], [1, 2]) == 0.5
    assert np.isnan(binary_auroc([], [1.0]))


def test_suite_optional_unavailable_transformer_gives_nan_with_reason():
    spec = {
        "sentiment": {"backend": "vader"},
        "transformers": [
            {"id": MISSING_ID, "optional": True, "prefix": "x_", "labels": ["Pos", "neg"]},
            {"id": MISSING_ID + "-2", "optional": True, "prefix": "y_"},
        ],
    }
    suite = build_suite(spec, device="cpu", batch_size=4, train_texts=[], train_labels=[], seed=0)
    scores = suite.score(["Lovely day."])
    assert scores[["x_pos", "x_neg"]].isna().all().all()
    assert scores["sentiment_compound"].notna().all()
    reasons = suite.null_reasons
    assert set(reasons) == {"x_pos", "x_neg", "y_*"}
    assert MISSING_ID in reasons["x_pos"]
    assert set(suite.unavailable) == {MISSING_ID, MISSING_ID + "-2"}
    assert suite.metric_ranges()["x_pos"] == (0.0, 1.0)


def test_suite_required_unavailable_transformer_raises():
    with pytest.raises(EvaluatorUnavailable, match=MISSING_ID):
        build_suite({"transformers": [{"id": MISSING_ID}]}, device="cpu", train_texts=[], train_labels=[])


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="vader"):
        build_suite({"sentiment": {"backend": "magic"}}, device="cpu")


def test_suite_scores_continuation_only():
    suite = EvaluatorSuite([VaderSentiment(), NrcLexiconEmotions()])
    prompts = ["I am furious and full of rage, you hateful idiot!"]
    continuation = ["The table is in the room."]
    only = suite.score(continuation, prompts=prompts)
    assert only.loc[0, "nrc_anger"] == 0.0
    assert only.loc[0, "sentiment_compound"] == 0.0
    full = suite.score(continuation, prompts=prompts, continuation_only=False)
    assert full.loc[0, "nrc_anger"] > 0.0
    assert full.loc[0, "sentiment_compound"] < 0.0


def test_suite_scores_each_distinct_text_once_in_first_seen_order():
    seen: list[list[str]] = []

    class Recording(VaderSentiment):
        def score(self, texts: list[str]) -> pd.DataFrame:
            seen.append(list(texts))
            return super().score(texts)

    texts = [
        "Thank you so much!",
        "I am furious.",
        "Thank you so much!",
        "",
        "I am furious.",
        "I am so sorry.",
    ]
    scores = EvaluatorSuite([Recording()]).score(texts)
    assert seen == [["Thank you so much!", "I am furious.", "I am so sorry."]]  # the empty text is degenerate
    alone = EvaluatorSuite([VaderSentiment()]).score(
        ["Thank you so much!", "I am furious.", "I am so sorry."]
    )
    for row, distinct in ((0, 0), (1, 1), (2, 0), (4, 1), (5, 2)):
        pd.testing.assert_series_equal(scores.loc[row], alone.loc[distinct], check_names=False)
    assert bool(scores.loc[3, "degenerate"])


def test_minilm_embeddings_are_unit_norm():
    emb = MiniLmEmbedder(device="cpu", batch_size=2)(["Thank you so much.", "I am furious.", "The table."])
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_resource_builds_embedded_suite_once():
    evaluators.clear_cache()
    spec = {
        "sentiment": {"backend": "vader"},
        "politeness": {"backend": "strategies"},
        "emotions": {"backend": "embedded"},
    }
    texts = [
        "Thank you so much!",
        "Thanks, I really appreciate it.",
        "I am furious!",
        "This makes me so angry.",
    ]
    labels = ["gratitude", "gratitude", "anger", "anger"]
    resource = evaluators.EvaluatorResource(device="cpu", batch_size=8)
    before = evaluators.load_count()
    suite = resource.suite(spec, texts, labels, seed=0)
    assert resource.suite(spec, list(texts), list(labels), seed=0) is suite
    assert evaluators.load_count() == before + 1
    scores = suite.score(["Thank you, that is kind.", "I am so angry at you."])
    np.testing.assert_allclose(scores[["emotion_anger", "emotion_gratitude"]].sum(axis=1), 1.0, atol=1e-9)
    assert scores.loc[0, "emotion_gratitude"] > 0.5 and scores.loc[1, "emotion_anger"] > 0.5
    assert not scores.isna().any().any()
    # Broken text: the embedded classifier alone would give "..." an emotion; this one has no neutral
    # class, so its columns are null there, with the reason, and the lexicon scorers are neutral.
    broken = suite.score(["...", "You"])
    assert broken["degenerate"].all()
    assert broken[["emotion_anger", "emotion_gratitude"]].isna().all().all()
    assert set(suite.null_reasons) == {"emotion_anger", "emotion_gratitude"}
    assert (broken["sentiment_compound"] == 0.0).all() and (broken["politeness"] == 0.5).all()


DEGENERATE = ["", "   ", "...", "!!!", "# # #", "You", "Thanks", "Sorry!", "\n\t"]
FLUENT = ["I am furious with you, this is outrageous.", "thank you so much for your kind help."]


def _suite_with_classifier(labels_kept: tuple[str, ...]) -> EvaluatorSuite:
    texts, labels = _labelled(6)
    keep = [i for i, lab in enumerate(labels) if lab in labels_kept]
    clf = EmbeddingEmotionClassifier(_fake_embed).fit([texts[i] for i in keep], [labels[i] for i in keep], 0)
    return EvaluatorSuite([VaderSentiment(), NrcLexiconEmotions(), PolitenessScorer(), clf])


def test_degenerate_text_scores_neutral_never_an_emotion():
    suite = _suite_with_classifier(("gratitude", "anger", "apology", "neutral"))
    scores = suite.score(DEGENERATE + FLUENT)
    bad, good = scores.iloc[: len(DEGENERATE)], scores.iloc[len(DEGENERATE) :]
    assert bad["degenerate"].all() and not good["degenerate"].any()
    assert scores["degenerate"].dtype == bool
    # All probability on neutral, no affect, neutral sentiment and politeness.
    assert (bad["emotion_neutral"] == 1.0).all()
    assert (bad[["emotion_gratitude", "emotion_anger", "emotion_apology"]] == 0.0).all().all()
    assert (bad[[c for c in scores if c.startswith("nrc_")]] == 0.0).all().all()
    assert (bad["sentiment_compound"] == 0.0).all() and (bad["sentiment_neu"] == 1.0).all()
    assert (bad["politeness"] == 0.5).all() and (bad["politeness_raw"] == 0.0).all()
    assert (bad[MARKER_COLUMN] == 0.0).all()
    assert not scores.drop(columns="degenerate").isna().any().any() and suite.null_reasons == {}
    # Without the guard, the same scorers do give these texts an emotion (what the guard prevents).
    raw = PolitenessScorer().score(["Thanks"])
    assert raw.loc[0, MARKER_COLUMN] == 1.0
    # A normal sentence scores exactly as each scorer scores it alone.
    for scorer in suite.scorers:
        alone = scorer.score(FLUENT)
        np.testing.assert_allclose(good[scorer.metric_names].to_numpy(), alone.to_numpy(), atol=1e-12)
    assert good["emotion_anger"].iloc[0] > 0.5 and good["emotion_gratitude"].iloc[1] > 0.5


def test_degenerate_text_is_null_with_reason_when_the_classifier_has_no_neutral_class():
    suite = _suite_with_classifier(("gratitude", "anger", "apology"))
    scores = suite.score(["...", "You", FLUENT[0]])
    emotion_cols = ["emotion_anger", "emotion_apology", "emotion_gratitude"]
    assert scores.loc[:1, emotion_cols].isna().all().all()
    assert scores.loc[2, emotion_cols].notna().all() and scores.loc[2, "emotion_anger"] > 0.5
    assert scores.loc[:1, "politeness"].eq(0.5).all()  # the other scorers stay neutral
    assert set(suite.null_reasons) == set(emotion_cols)
    assert "degenerate" in suite.null_reasons["emotion_anger"]
    assert suite.describe()["degenerate_scores"]["emotion_anger"] is None


def test_transformer_classifier_puts_degenerate_text_on_its_neutral_label(tmp_path):
    _tiny_classifier(tmp_path)
    clf = TransformerClassifier(str(tmp_path), device="cpu", batch_size=2, prefix="t_")
    scores = EvaluatorSuite([clf]).score(["# # #", "You", TEXTS[1]])
    assert (
        scores.loc[:1, "t_neutral"].eq(1.0).all()
        and scores.loc[:1, ["t_very_happy", "t_sad"]].eq(0).all().all()
    )
    np.testing.assert_allclose(
        scores.loc[2, clf.metric_names].to_numpy(float), clf.score([TEXTS[1]]).iloc[0], atol=1e-6
    )

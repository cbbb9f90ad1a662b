"""The corpus's text feeds: the toy exports get short sentences, the BERT-base-size encoder the
128-token sentence pairs it is deployed at (its manifest's ``feed_sequences``). Feeds only: no model
is loaded or run."""

from __future__ import annotations

import numpy as np

from models.realworld import corpus

BASE = "transformers_bert_base_dynamo"


def test_the_bert_base_encoder_is_fed_sentence_pairs_at_its_deployed_length():
    case = corpus.case(BASE)
    calibration, evaluation = case.calibration(6), case.evaluation(3)
    assert [f["input_ids"].shape[1] for f in calibration] == [128, 96, 112, 128, 96, 112]
    assert evaluation[0]["input_ids"].shape == (1, 128)  # the feed tools/bench_realworld.py times
    ids, types = evaluation[0]["input_ids"][0], evaluation[0]["token_type_ids"][0]
    assert ids[0] == 1 and (ids[1:] >= 4).sum() == 125 and ids.max() < 30522  # [CLS] a [SEP] b [SEP]
    assert set(np.unique(types)) == {0, 1} and (evaluation[0]["attention_mask"] == 1).all()
    padded = calibration[2]  # every third feed: batch 2, the shorter row padded
    assert padded["input_ids"].shape[0] == 2 and (padded["attention_mask"][1] == 0).any()


def test_the_toy_text_exports_keep_their_short_sentences():
    feeds = corpus.case("transformers_bert_dynamo").calibration(3)
    assert [f["input_ids"].shape[1] for f in feeds] == [12, 24, 40]

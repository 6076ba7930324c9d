"""Tokenized datasets and their collators (``docs/algorithm.md`` section 2).

* :class:`SupervisedDataset` -- ``prompt + response + eos``; labels are the input ids with the prompt tokens set
  to ``IGNORE_INDEX`` (loss on response tokens only); a dialogue row trains on every assistant turn.
* :class:`PreferenceDataset` -- (better, worse) sequences; the collator right-pads and stacks them into one
  ``2B`` batch, better rows first.
* :class:`SafetyPreferenceDataset` -- (safer, unsafer) sequences and their safety labels; rejects a pair whose
  "safer" response is labelled unsafe while the other is labelled safe, or whose two sequences are token-identical.
* :class:`PromptOnlyDataset` -- templated prompts, deduplicated (the last of equal prompts kept, in row order);
  the collator left-pads them for generation.

Everything is tokenized when the dataset is built, so bad rows fail before any training starts.  Sequences are
truncated to ``max_length`` tokens (as in the reference implementation); a prompt that leaves no room for a
single response token is an error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..ops import IGNORE_INDEX
from .errors import DataError
from .sources import Record, load_records
from .template import CHAT_TEMPLATES, PROMPT_ASSISTANT, PROMPT_BEGIN, PROMPT_USER, format_chat_prompt, format_prompt

logger = logging.getLogger(__name__)


def right_pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def left_pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, width - len(s):] = s
    return out


def _lengths_mask(seqs: list[torch.Tensor], left: bool) -> torch.Tensor:
    ones = [torch.ones(len(s), dtype=torch.long) for s in seqs]
    return (left_pad if left else right_pad)(ones, 0).bool()


class TokenizedDataset(Dataset):
    """Rows of ``NAME[:PROPORTION[:PATH]]`` specs (or ready :class:`Record` s), templated and tokenized.  ``flag``:
    the option the specs came from (named by an error about a spec)."""

    def __init__(self, datasets, tokenizer, max_length: int | None = None, seed: int = 42,
                 chat_template: str = "reference", flag: str | None = None):
        self.tokenizer = tokenizer
        if chat_template not in CHAT_TEMPLATES:
            raise DataError(f"chat_template {chat_template!r}: expected one of {', '.join(CHAT_TEMPLATES)}")
        if chat_template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise DataError("--chat_template tokenizer: the tokenizer has no chat_template")
        self.chat_template = chat_template  # "reference": format_prompt; "tokenizer": the tokenizer's own template
        self.max_length = int(max_length or tokenizer.model_max_length)
        if self.max_length < 2:
            raise DataError(f"max_length must be at least 2, got {self.max_length}")
        if isinstance(datasets, list) and datasets and isinstance(datasets[0], Record):
            records = datasets
        else:
            records = load_records(datasets, seed=seed, flag=flag)
        self.num_truncated = 0  # of the num_sequences tokenized (a pair's two sequences count as two)
        self.num_sequences = 0
        self.items: list[dict] = []
        self._build(records)
        if self.num_truncated:
            logger.warning("%d of %d sequences were truncated to max_length=%d", self.num_truncated,
                           self.num_sequences, self.max_length)

    # ---- helpers shared by the subclasses ---------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _prompt_texts(self, records: list[Record]) -> list[str]:
        if self.chat_template == "tokenizer":
            return [format_chat_prompt(r.prompt(), self.tokenizer) for r in records]
        return [format_prompt(r.prompt(), eos_token=self.tokenizer.eos_token) for r in records]

    def _check_prompts(self, records: list[Record], prompts: list[str], room: int = 1) -> list[int]:
        """Prompt lengths in tokens; a prompt longer than ``max_length - room`` is an error."""
        ids = self.tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]
        limit = self.max_length - room
        for rec, seq in zip(records, ids):
            if len(seq) > limit:
                raise rec.error("prompt", f"the templated prompt is {len(seq)} tokens, longer than max_length="
                                          f"{self.max_length} allows (at most {limit}, to leave room for the response)")
        return [len(s) for s in ids]

    def _tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        full = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        out = []
        self.num_sequences += len(full)
        for seq in full:
            if len(seq) > self.max_length:
                self.num_truncated += 1
                seq = seq[: self.max_length]
            out.append(torch.tensor(seq, dtype=torch.long))
        return out

    def _build(self, records: list[Record]) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class SupervisedDataset(TokenizedDataset):
    """Instruction rows (loss on the response) and dialogue rows (loss on every assistant turn), in row order."""

    def _build(self, records):
        singles = [i for i, r in enumerate(records) if "dialogue" not in r.data]
        items = dict(zip(singles, self._single_turn_items([records[i] for i in singles])))
        dialogues = [i for i, r in enumerate(records) if "dialogue" in r.data]
        items.update(zip(dialogues, self._dialogue_items([records[i] for i in dialogues])))
        self.items.extend(items[i] for i in range(len(records)))

    def _single_turn_items(self, records) -> list[dict]:
        if not records:
            return []
        prompts = self._prompt_texts(records)
        answers = [r.answer() for r in records]
        prompt_lens = self._check_prompts(records, prompts)
        eos = self.tokenizer.eos_token
        out = []
        for ids, n_prompt in zip(self._tokenize([p + a + eos for p, a in zip(prompts, answers)]), prompt_lens):
            labels = ids.clone()
            labels[:n_prompt] = IGNORE_INDEX
            out.append({"input_ids": ids, "labels": labels})
        return out

    def _dialogue_prefixes(self, rec: Record) -> list[str]:
        """The text after each turn, as the reference builds it: ``PROMPT_BEGIN``, then ``USER: {turn}
        ASSISTANT:`` for a user turn and ``{turn}{eos}`` for an assistant turn."""
        if self.chat_template != "reference":
            raise rec.error("dialogue", "dialogue rows need --chat_template reference")
        text, prefixes = PROMPT_BEGIN, []
        for i, turn in enumerate(rec.dialogue()):
            text += PROMPT_USER.format(input=turn) + PROMPT_ASSISTANT if i % 2 == 0 else \
                turn + self.tokenizer.eos_token
            prefixes.append(text)
        return prefixes

    def _dialogue_items(self, records) -> list[dict]:
        """The reference's ``SupervisedDataset.preprocess`` for a dialogue: the ids of the whole text; labels
        masked from the end of each assistant turn to the end of the next user turn (token counts of the
        tokenized prefixes, each truncated to max_length)."""
        prefixes = [self._dialogue_prefixes(r) for r in records]
        if not prefixes:
            return []
        flat = self.tokenizer([t for p in prefixes for t in p], add_special_tokens=True, verbose=False)["input_ids"]
        lengths = iter(min(len(ids), self.max_length) for ids in flat)
        full = self._tokenize([p[-1] for p in prefixes])
        out = []
        for p, ids in zip(prefixes, full):
            offsets = [0] + [next(lengths) for _ in p]
            labels = ids.clone()
            for begin, end in zip(offsets[::2], offsets[1::2]):
                labels[begin:end] = IGNORE_INDEX
            out.append({"input_ids": ids, "labels": labels})
        return out

    def collator(self):
        return SupervisedCollator(self.pad_token_id)


def _pair_texts(dataset: TokenizedDataset, records, prompts):
    eos = dataset.tokenizer.eos_token
    r0 = [prompt + rec.text("response_0", allow_empty=True) + eos for rec, prompt in zip(records, prompts)]
    r1 = [prompt + rec.text("response_1", allow_empty=True) + eos for rec, prompt in zip(records, prompts)]
    return dataset._tokenize(r0), dataset._tokenize(r1)


def _check_distinct(rec: Record, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape == b.shape and bool(torch.equal(a, b)):
        raise rec.error("response_1", "the two responses are token-identical after tokenization (and truncation)")


class PreferenceDataset(TokenizedDataset):
    """Helpfulness pairs from PKU-SafeRLHF rows (``better_response_id``)."""

    def _build(self, records):
        prompts = self._prompt_texts(records)
        better = [rec.choice01("better_response_id") for rec in records]
        self._check_prompts(records, prompts)
        ids0, ids1 = _pair_texts(self, records, prompts)
        for rec, b, a0, a1 in zip(records, better, ids0, ids1):
            _check_distinct(rec, a0, a1)
            good, bad = (a0, a1) if b == 0 else (a1, a0)
            self.items.append({"better_input_ids": good, "worse_input_ids": bad})

    def collator(self):
        return PreferenceCollator(self.pad_token_id)


class SafetyPreferenceDataset(TokenizedDataset):
    """Harmlessness pairs from PKU-SafeRLHF rows (``safer_response_id`` and the two safety labels)."""

    def _build(self, records):
        prompts = self._prompt_texts(records)
        labels = []
        for rec in records:
            safer = rec.choice01("safer_response_id")
            safe = (rec.flag("is_response_0_safe"), rec.flag("is_response_1_safe"))
            if not safe[safer] and safe[1 - safer]:
                raise rec.error("safer_response_id", f"response_{safer} is marked safer but labelled unsafe "
                                                     f"(is_response_{safer}_safe=false) while response_{1 - safer} "
                                                     f"is labelled safe")
            labels.append((safer, safe))
        self._check_prompts(records, prompts)
        ids0, ids1 = _pair_texts(self, records, prompts)
        for rec, (safer, safe), a0, a1 in zip(records, labels, ids0, ids1):
            _check_distinct(rec, a0, a1)
            pair = (a0, a1)
            self.items.append({
                "safer_input_ids": pair[safer], "unsafer_input_ids": pair[1 - safer],
                "safer_is_safe": safe[safer], "unsafer_is_safe": safe[1 - safer],
            })

    def collator(self):
        return SafetyPreferenceCollator(self.pad_token_id)


class PromptOnlyDataset(TokenizedDataset):
    """Templated prompts, deduplicated as the reference does: of equal prompts the last one is kept, and the kept
    rows stay in row order.  Items carry ``is_harmful`` when the row has it."""

    def _build(self, records):
        prompts = self._prompt_texts(records)
        last = {prompt: i for i, prompt in enumerate(prompts)}
        keep = sorted(last.values())
        records, prompts = [records[i] for i in keep], [prompts[i] for i in keep]
        self._check_prompts(records, prompts)
        for rec, prompt, ids in zip(records, prompts, self._tokenize(prompts)):
            item = {"input_ids": ids, "prompt": prompt}
            if isinstance(rec.data.get("is_harmful"), bool):
                item["is_harmful"] = rec.data["is_harmful"]
            self.items.append(item)

    def collator(self):
        return PromptOnlyCollator(self.pad_token_id)


# ------------------------------------------------------------------------------------------------ collators
@dataclass
class SupervisedCollator:
    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        seqs = [it["input_ids"] for it in items]
        return {
            "input_ids": right_pad(seqs, self.pad_token_id),
            "attention_mask": _lengths_mask(seqs, left=False),
            "labels": right_pad([it["labels"] for it in items], IGNORE_INDEX),
        }


@dataclass
class PreferenceCollator:
    """``input_ids`` / ``attention_mask`` of shape [2B, L]: rows 0..B-1 the better responses, B..2B-1 the worse."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        seqs = [it["better_input_ids"] for it in items] + [it["worse_input_ids"] for it in items]
        return {"input_ids": right_pad(seqs, self.pad_token_id), "attention_mask": _lengths_mask(seqs, left=False)}


@dataclass
class SafetyPreferenceCollator:
    """[2B, L] batch, rows 0..B-1 the safer responses, B..2B-1 the unsafer ones; ``is_safe`` [2B] bool labels and
    ``cost_sign`` [2B] (+1 labelled unsafe, -1 labelled safe)."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        seqs = [it["safer_input_ids"] for it in items] + [it["unsafer_input_ids"] for it in items]
        is_safe = torch.tensor([it["safer_is_safe"] for it in items] + [it["unsafer_is_safe"] for it in items])
        return {
            "input_ids": right_pad(seqs, self.pad_token_id),
            "attention_mask": _lengths_mask(seqs, left=False),
            "is_safe": is_safe,
            "cost_sign": 1.0 - 2.0 * is_safe.float(),
        }


@dataclass
class PromptOnlyCollator:
    """Left-padded prompts for generation."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        seqs = [it["input_ids"] for it in items]
        return {"input_ids": left_pad(seqs, self.pad_token_id), "attention_mask": _lengths_mask(seqs, left=True)}

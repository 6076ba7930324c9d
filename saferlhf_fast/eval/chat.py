"""``saferlhf-fast chat``: talk to one model, or to two side by side, on our generation engine (the reference's
``safe_rlhf.serve.cli`` and ``safe_rlhf.serve.arena``).

Each model keeps its own conversation ``[user, assistant, ..., user]``.  A turn's prompt is the whole conversation
rendered with a prompt template: the model's own chat template (``tokenizer.apply_chat_template`` with the
generation prompt) or the Safe RLHF one (``BEGINNING OF CONVERSATION: USER: ... ASSISTANT:``, each earlier answer
closed by eos; ``docs/algorithm.md`` section 2); ``--template auto`` takes the model's when its tokenizer has one.
Prompts are tokenized as training tokenizes them (``add_special_tokens=True``).  When the conversation no longer
fits in ``--max_length`` (prompt + at least one new token), its oldest exchanges are left out of the prompt.

Tokens are printed as they are generated (``generate(..., on_token=...)``).  With ``--reward_model_name_or_path`` /
``--cost_model_name_or_path`` every answer is scored as ``arena`` scores it: the end score of ``prompt + response +
eos`` under the score model (normalised when its folder carries a normalizer); a cost <= 0 is safe.

Non-interactive: ``--prompts FILE --output FILE.jsonl`` answers every prompt of FILE (JSONL rows with a ``prompt``
field, or plain text, one prompt per line) as a single-turn conversation and writes one JSON line per prompt.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import unicodedata
from dataclasses import dataclass, field

import torch

from ..data import DataError, left_pad, load_tokenizer
from ..data.errors import describe
from ..data.template import format_chat_prompt, format_prompt
from ..engine import generate
from ..loading import check_vocab, require_score_head
from ..models.attention import BACKENDS as ATTN_BACKENDS
from ..models.checkpoint import MODEL_BACKENDS
from ..options import ConfigError, check_finite_numbers, option
from ..runtime import apply_tf32, resolve_device
from .arena import _check, _load_policy, _load_scorer, score_texts

TEMPLATES = ("auto", "model", "safe-rlhf")
COMMANDS = {"/reset": "forget the conversation (every model's)", "/clear": "clear the screen",
            "/help": "this list", "/exit": "leave (also Ctrl-D)"}


@dataclass
class ChatConfig:
    """``saferlhf-fast chat`` (flag names: the reference's ``safe_rlhf.serve.cli`` / ``serve.arena``)."""

    model_name_or_path: list[str] = option([], "one model folder, or two: every turn is answered by both, side by "
                                               "side, each with its own conversation", required=True, group="model")
    reward_model_name_or_path: str | None = option(None, "print each answer's reward under this reward model",
                                                   group="model")
    cost_model_name_or_path: str | None = option(None, "print each answer's cost under this cost model (<= 0: safe)",
                                                 group="model")
    template: str = option("auto", "prompt template: 'model' (the tokenizer's chat template), 'safe-rlhf' "
                                   "(BEGINNING OF CONVERSATION: USER: ... ASSISTANT:), 'auto' (the model's when its "
                                   "tokenizer has one)", choices=list(TEMPLATES), group="model")
    prompts: str | None = option(None, "answer every prompt of this file instead of chatting (JSONL rows with a "
                                       "'prompt' field, or plain text: one prompt per line); needs --output",
                                 group="data")
    output: str | None = option(None, "with --prompts: write one JSON line per prompt here (prompt, every model's "
                                      "response, reward / cost when given)", group="data")
    overwrite: bool = option(False, "with --output: replace an existing file", group="data")
    max_length: int = option(512, "maximum total length of prompt + response in tokens (older turns are left out of "
                                  "the prompt to fit)", group="generation")
    max_new_tokens: int | None = option(None, "cap on generated tokens (default: max_length - prompt length)",
                                        group="generation")
    do_sample: bool = option(True, "sample; False: greedy decoding", group="generation")
    temperature: float = option(1.0, "sampling temperature", group="generation")
    top_p: float = option(1.0, "nucleus sampling", group="generation")
    top_k: int = option(0, "top-k sampling (0: off)", group="generation")
    repetition_penalty: float = option(1.0, "repetition penalty", group="generation")
    seed: int = option(42, "turn k (batch k with --prompts) samples with seed + k", group="generation")
    stream: bool = option(True, "print tokens as they are generated; False: each answer when it is complete (two "
                                "models: in two columns)", group="generation")
    per_device_eval_batch_size: int = option(8, "prompts per generation batch (--prompts)", group="generation")
    fp16: bool = option(False, "fp16 autocast (weights stay fp32)", group="precision and devices")
    bf16: bool = option(False, "bf16 autocast (weights stay fp32)", group="precision and devices")
    tf32: bool | None = option(None, "allow TF32 matmuls on CUDA", group="precision and devices")
    device: str = option("auto", "cpu, cuda, cuda:N or auto", group="precision and devices")
    backend: str = option("auto", "model implementation: native, hf (transformers) or auto (native when the "
                                  "architecture is ours)", choices=list(MODEL_BACKENDS), group="precision and devices")
    attn_backend: str | None = option(None, "attention backend of the models", choices=list(ATTN_BACKENDS),
                                      group="precision and devices")

    @property
    def command(self) -> str:
        return "chat"

    def validate(self) -> None:
        if not 1 <= len(self.model_name_or_path) <= 2:
            raise ConfigError(f"--model_name_or_path: give one model or two, got {len(self.model_name_or_path)}")
        if (self.prompts is None) != (self.output is None):
            raise ConfigError("--prompts and --output go together (batch mode); give both or neither")
        if self.max_length < 2 or self.per_device_eval_batch_size < 1:
            raise ConfigError("--max_length must be >= 2 and --per_device_eval_batch_size >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0 when sampling, got {self.temperature}")
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are exclusive")
        if self.output is not None and os.path.exists(self.output) and not self.overwrite:
            raise ConfigError(f"--output {self.output} exists; pass --overwrite to replace it")
        check_finite_numbers(self)

    def autocast(self, device: torch.device):
        dtype = torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def sampling(self) -> dict:
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty)


# ------------------------------------------------------------------------------------------------ models
@dataclass
class Policy:
    """A model that answers, its tokenizer, the template it is prompted with and its own conversation."""

    label: str
    path: str
    model: object
    tokenizer: object
    template: str  # "model" or "safe-rlhf"
    history: list[str] = field(default_factory=list)  # [user, assistant, ...] of the finished turns

    def render(self, turns: list[str]) -> str:
        if self.template == "model":
            return format_chat_prompt(turns, self.tokenizer)
        return format_prompt(turns, eos_token=self.tokenizer.eos_token)

    def encode(self, turns: list[str]) -> list[int]:
        return self.tokenizer(self.render(turns), add_special_tokens=True, verbose=False)["input_ids"]

    def fit(self, message: str, max_length: int) -> tuple[list[str], list[int], int]:
        """(turns, token ids, exchanges left out): the conversation with ``message`` appended, its oldest
        exchanges dropped until the prompt leaves room for one new token.  None of it fits: a ``ValueError``."""
        for dropped in range(0, len(self.history) // 2 + 1):
            turns = self.history[2 * dropped:] + [message]
            ids = self.encode(turns)
            if len(ids) < max_length:
                return turns, ids, dropped
        raise ValueError(f"this message is {len(ids)} tokens after templating, too long for --max_length "
                         f"{max_length}")


@dataclass
class Scorer:
    """A reward or cost model: end scores of ``prompt + response + eos`` (``arena.score_texts``)."""

    kind: str  # "reward" or "cost"
    model: object
    tokenizer: object
    normalizer: object

    def __call__(self, prompts: list[str], responses: list[str], max_length: int, batch_size: int) -> list[float]:
        return score_texts(self.model, self.tokenizer, self.normalizer, prompts, responses, max_length=max_length,
                           batch_size=batch_size).tolist()


def pick_template(requested: str, tokenizer, path: str) -> str:
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if requested == "model" and not has_own:
        raise ConfigError(f"--template model: the tokenizer of {path} has no chat template (use --template safe-rlhf)")
    if requested == "auto":
        return "model" if has_own else "safe-rlhf"
    return requested


def labels_of(paths: list[str]) -> list[str]:
    """Short names for the answers: each folder's last component (the whole path when two are the same)."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def check_folders(cfg: ChatConfig) -> list[str]:
    """Before any weights load: every folder is a model whose vocabulary covers its tokenizer, the reward and cost
    models carry trained score heads, and ``--template`` suits every policy.  The policies' templates, in order."""
    templates = []
    for path in cfg.model_name_or_path:
        _check("model_name_or_path", path)
        tok = load_tokenizer(path, cfg.max_length)
        check_vocab(tok, path, "model_name_or_path", path)
        templates.append(pick_template(cfg.template, tok, path))
    for kind in ("reward", "cost"):
        path = getattr(cfg, f"{kind}_model_name_or_path")
        if path is not None:
            _check(f"{kind}_model_name_or_path", path)
            require_score_head(f"{kind}_model_name_or_path", path, "rm" if kind == "reward" else "cm")
    return templates


def load_policies(cfg: ChatConfig, device) -> list[Policy]:
    policies = []
    for path, label, template in zip(cfg.model_name_or_path, labels_of(cfg.model_name_or_path), check_folders(cfg)):
        model, tok = _load_policy("model_name_or_path", path, device, cfg.attn_backend, cfg.max_length,
                                  cfg.backend)
        policies.append(Policy(label, path, model, tok, template))
    return policies


def load_scorers(cfg: ChatConfig, device) -> list[Scorer]:
    scorers = []
    for kind in ("reward", "cost"):
        path = getattr(cfg, f"{kind}_model_name_or_path")
        if path is None:
            continue
        model, tok, norm = _load_scorer(f"{kind}_model_name_or_path", path, device, cfg.attn_backend, cfg.max_length,
                                       cfg.backend)
        tok.truncation_side = "left"  # a long conversation keeps its end: the answer being judged
        scorers.append(Scorer(kind, model, tok, norm))
    return scorers


def score_line(scores: dict[str, float]) -> str:
    parts = [f"reward {scores['reward']:+.3f}"] if "reward" in scores else []
    if "cost" in scores:
        parts.append(f"cost {scores['cost']:+.3f} ({'safe' if scores['cost'] <= 0 else 'unsafe'})")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ streaming
class TextStream:
    """Token ids in, printable text out: the whole answer is decoded again at every token and only the new suffix
    is written, held back while it ends in an incomplete UTF-8 sequence (a byte-level BPE token can be half a
    character)."""

    def __init__(self, tokenizer, write):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        self._emit(final=False)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

    def close(self) -> str:
        self._emit(final=True)
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def answer(policy: Policy, prompt_ids: list[int], cfg: ChatConfig, seed: int, device, write=None) -> str:
    """``policy``'s answer to one prompt (decoded, special tokens skipped), written piece by piece to ``write``."""
    tok = policy.tokenizer
    new = max(1, cfg.max_length - len(prompt_ids))
    if cfg.max_new_tokens is not None:
        new = min(new, cfg.max_new_tokens)
    stream = TextStream(tok, write) if write is not None else None

    def on_token(tokens, emitted):
        if bool(emitted[0]):
            stream.push(int(tokens[0]))

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    with cfg.autocast(device):
        gen = generate(policy.model, ids, max_new_tokens=new, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, seed=seed, on_token=on_token if stream else None,
                       **cfg.sampling())
    if stream is not None:
        stream.close()
    return tok.decode(gen.responses[0][gen.response_mask[0]].tolist(), skip_special_tokens=True)


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters other than newline and tab (an escape sequence from a
    model would move the cursor or recolour the screen) shown as U+FFFD."""
    return "".join("\ufffd" if unicodedata.category(ch) == "Cc" and ch not in "\n\t" else ch for ch in text)


def side_by_side(blocks: list[tuple[str, str]], width: int) -> str:
    """Labelled texts in columns of equal width, separated by `` | ``."""
    col = max(20, (width - 3 * (len(blocks) - 1)) // len(blocks))
    cols = []
    for label, text in blocks:
        lines = [label[:col], "-" * min(col, len(label))]
        for para in text.splitlines() or [""]:
            lines.extend(textwrap.wrap(para, col) or [""])
        cols.append(lines)
    height = max(len(c) for c in cols)
    rows = []
    for i in range(height):
        rows.append(" | ".join((c[i] if i < len(c) else "").ljust(col) for c in cols).rstrip())
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ interactive
class Session:
    """The read-answer loop: one line of input per turn, every model answers it, scores follow each answer."""

    def __init__(self, cfg: ChatConfig, policies: list[Policy], scorers: list[Scorer], device, out=None):
        self.cfg, self.policies, self.scorers, self.device = cfg, policies, scorers, device
        self.out = out or sys.stdout
        self.turn = 0

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def banner(self) -> None:
        who = ", ".join(f"{p.label} (template {p.template})" for p in self.policies)
        self.say(f"saferlhf-fast chat with {who}")
        self.say(f"commands: {', '.join(COMMANDS)} (or Ctrl-D to leave); /help says what each does")

    def run(self, read=input) -> int:
        self.banner()
        while True:
            try:
                line = read("user> ")
            except (EOFError, KeyboardInterrupt):
                self.say()
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and not self.command(text):
                return 0
            if not text.startswith("/"):
                self.respond(text)

    def command(self, text: str) -> bool:
        """Run a /command; False to leave."""
        name = text.split()[0]
        if name == "/exit":
            return False
        if name == "/reset":
            for p in self.policies:
                p.history.clear()
            self.say("(conversation reset)")
        elif name == "/clear":
            self.say("\x1b[2J\x1b[H", end="")
        elif name == "/help":
            for c, h in COMMANDS.items():
                self.say(f"  {c:<8} {h}")
        else:
            self.say(f"unknown command {name}; commands: {', '.join(COMMANDS)}")
        return True

    def respond(self, message: str) -> None:
        """Every model answers ``message`` after its own conversation; a model that cannot take it (too long) or
        an answer stopped with Ctrl-C leaves every conversation as it was."""
        seed = self.cfg.seed + self.turn
        self.turn += 1
        finished = []
        for policy in self.policies:
            try:
                turns, ids, dropped = policy.fit(message, self.cfg.max_length)
            except ValueError as err:
                self.say(f"({policy.label}: {err}; not sent)")
                return
            if dropped:
                self.say(f"({policy.label}: the {dropped} oldest exchange(s) no longer fit in --max_length "
                         f"{self.cfg.max_length} and are left out)")
            try:
                text, scores = self.one_answer(policy, turns, ids, seed)
            except KeyboardInterrupt:
                self.say(" [interrupted; this turn is forgotten]")
                return
            finished.append((policy, turns, text, scores))
        if not self.cfg.stream:
            self.show(finished)
        for policy, turns, text, _ in finished:
            policy.history[:] = turns + [text]

    def one_answer(self, policy: Policy, turns: list[str], ids: list[int], seed: int) -> tuple[str, dict]:
        """(answer, scores); streamed to the screen with ``--stream`` (the default), with the scores after it."""
        write = None
        if self.cfg.stream:
            self.say(f"{self.label(policy)}> ", end="")
            write = lambda piece: self.say(printable(piece), end="")  # noqa: E731
        text = answer(policy, ids, self.cfg, seed, self.device, write=write)
        scores = self.score(policy.render(turns), text)
        if self.cfg.stream:
            self.say()
            if scores:
                self.say(f"{' ' * len(self.label(policy))}  [{score_line(scores)}]")
        return text, scores

    def label(self, policy: Policy) -> str:
        if len(self.policies) == 1:
            return "assistant"
        return f"[{'AB'[self.policies.index(policy)]}] {policy.label}"

    def score(self, prompt: str, text: str) -> dict[str, float]:
        with self.cfg.autocast(self.device):
            return {s.kind: s([prompt], [text], self.cfg.max_length, 1)[0] for s in self.scorers}

    def show(self, finished) -> None:
        """The complete answers (``--stream False``): one below the other, two in columns."""
        blocks = [(self.label(p), printable(text.strip()) + (f"\n[{score_line(scores)}]" if scores else ""))
                  for p, _, text, scores in finished]
        if len(blocks) == 1:
            label, text = blocks[0]
            self.say(f"{label}> {text}")
        else:
            self.say(side_by_side(blocks, shutil.get_terminal_size((100, 24)).columns))


# ------------------------------------------------------------------------------------------------ batch mode
def read_prompts(path: str) -> list[str]:
    """The prompts of ``--prompts FILE``: JSONL (a ``.jsonl`` / ``.json`` name, or a first line that starts with
    ``{``), one object with a non-empty string ``prompt`` per line; else plain text, one prompt per non-blank
    line.  Blank lines are skipped; rows are numbered by line."""
    if not os.path.isfile(path):
        raise DataError("no such file", flag="--prompts", source=path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte 0x{raw[e.start]:02x})", source=path,
                        row=raw.count(b"\n", 0, e.start) + 1) from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError("no prompts (the file is empty)", source=path)
    is_jsonl = path.endswith((".jsonl", ".json")) or lines[0][1].lstrip().startswith("{")
    return [_json_prompt(path, n, line) if is_jsonl else line.strip() for n, line in lines]


def _json_prompt(path: str, row: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", source=path, row=row) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object with a 'prompt' field, got {describe(obj)}", source=path, row=row)
    if "prompt" not in obj:
        raise DataError("missing", source=path, row=row, field="prompt")
    value = obj["prompt"]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"expected a non-empty string, got {describe(value)}", source=path, row=row, field="prompt")
    return value


def encode_all(policy: Policy, prompts: list[str], max_length: int, path: str) -> list[list[int]]:
    """Every prompt as a single-turn conversation, tokenized; one too long for ``--max_length`` names its row."""
    encoded = []
    for row, prompt in enumerate(prompts, 1):
        ids = policy.encode([prompt])
        if len(ids) >= max_length:
            raise DataError(f"the templated prompt is {len(ids)} tokens for {policy.path}; --max_length "
                            f"{max_length} leaves room for at most {max_length - 1}", source=path, row=row,
                            field="prompt")
        encoded.append(ids)
    return encoded


def answer_batch(policy: Policy, encoded: list[list[int]], cfg: ChatConfig, device, progress) -> list[str]:
    """``policy``'s answers to tokenized prompts, ``--per_device_eval_batch_size`` at a time (batch k: seed +
    k), left-padded."""
    tok = policy.tokenizer
    out = []
    for k, start in enumerate(range(0, len(encoded), cfg.per_device_eval_batch_size)):
        chunk = [torch.tensor(ids, dtype=torch.long) for ids in encoded[start:start + cfg.per_device_eval_batch_size]]
        ids = left_pad(chunk, tok.pad_token_id)
        mask = left_pad([torch.ones(len(c), dtype=torch.long) for c in chunk], 0).bool()
        new = max(1, cfg.max_length - ids.shape[1])
        if cfg.max_new_tokens is not None:
            new = min(new, cfg.max_new_tokens)
        with cfg.autocast(device):
            gen = generate(policy.model, ids.to(device), mask.to(device), max_new_tokens=new,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=cfg.seed + k,
                           **cfg.sampling())
        for row, m in zip(gen.responses.cpu(), gen.response_mask.cpu()):
            out.append(tok.decode(row[m].tolist(), skip_special_tokens=True))
        progress.update(len(chunk))
    return out


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    """``path`` appears complete or not at all: written to a temporary file beside it, then renamed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_batch(cfg: ChatConfig, policies: list[Policy], scorers: list[Scorer], device) -> list[dict]:
    """``--prompts`` -> ``--output``: one row ``{"prompt", "responses": [{"model", "response", "reward"?,
    "cost"?}, ...]}`` per prompt, in file order."""
    from tqdm.auto import tqdm

    prompts = read_prompts(cfg.prompts)
    encoded = [encode_all(p, prompts, cfg.max_length, cfg.prompts) for p in policies]
    rows = [{"prompt": prompt, "responses": []} for prompt in prompts]
    with tqdm(total=len(prompts) * len(policies), desc="chat", unit="answer", file=sys.stderr) as progress:
        for policy, ids in zip(policies, encoded):
            responses = answer_batch(policy, ids, cfg, device, progress)
            texts = [policy.render([p]) for p in prompts]
            scores = {}
            with cfg.autocast(device):
                for s in scorers:
                    scores[s.kind] = s(texts, responses, cfg.max_length, cfg.per_device_eval_batch_size)
            for i, (row, response) in enumerate(zip(rows, responses)):
                row["responses"].append({"model": policy.path, "response": response,
                                         **{kind: values[i] for kind, values in scores.items()}})
    write_jsonl_atomic(cfg.output, rows)
    print(f"{len(rows)} prompts answered by {len(policies)} model(s): {cfg.output}")
    return rows


# ------------------------------------------------------------------------------------------------ entry point
def run_chat(cfg: ChatConfig) -> int:
    device = resolve_device(cfg.device)
    apply_tf32(cfg.tf32)
    if cfg.prompts is not None:
        read_prompts(cfg.prompts)  # a bad file fails before any model loads
    policies = load_policies(cfg, device)
    scorers = load_scorers(cfg, device)
    if cfg.prompts is not None:
        run_batch(cfg, policies, scorers, device)
        return 0
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    return Session(cfg, policies, scorers, device).run()

"""``saferlhf-fast chat``: the engine's per-token hook, the interactive mode driven through a pseudo-terminal (type,
read the screen), two models side by side, rewards and costs, batch mode and its bad inputs."""
import fcntl
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

from saferlhf_fast.cli import main
from saferlhf_fast.data.template import format_prompt
from saferlhf_fast.engine import generate
from saferlhf_fast.eval.chat import ChatConfig, Policy, Session, TextStream, printable, read_prompts, side_by_side
from saferlhf_fast.models import from_pretrained
from saferlhf_fast.trainers.modeling import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "how do i bake bread ?"


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_score_model):
    """Two tiny random Llama policies (red, blue) and a reward and a cost model on red's backbone."""
    root = tmp_path_factory.mktemp("chat")
    red = make_tiny_model(str(root / "red"), hidden_size=32, num_layers=1, num_heads=2, seed=1)
    blue = make_tiny_model(str(root / "blue"), hidden_size=32, num_layers=1, num_heads=2, seed=2)
    rm = make_score_model(red, str(root / "rm"), 3)
    cm = make_score_model(red, str(root / "cm"), 4, bias=0.5)
    return {"red": red, "blue": blue, "rm": rm, "cm": cm}


# ------------------------------------------------------------------------------------------------ engine hook
@pytest.mark.parametrize("fast_decode", [True, False])
def test_on_token_streams_exactly_the_generated_tokens(models, fast_decode):
    """The hook sees every step's tokens and which rows emitted one; the sequences and log-probs are those of the
    same seeded call without the hook (rows of different lengths, sampling with top-k / top-p / penalty)."""
    model = from_pretrained(models["red"])
    ids = torch.tensor([[0, 0, 5, 9, 17], [4, 8, 15, 16, 23]])
    mask = ids != 0
    mask[1] = True
    eos = list(range(1, model.config.vocab_size, 13))  # every 13th id ends a row: rows finish at different steps
    kw = dict(max_new_tokens=40, do_sample=True, temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.1,
              eos_token_id=eos, seed=3, fast_decode=fast_decode)
    steps = []
    streamed = generate(model, ids, mask, on_token=lambda tok, emitted: steps.append((tok.clone(), emitted)), **kw)
    plain = generate(model, ids, mask, **kw)
    assert torch.equal(streamed.sequences, plain.sequences)
    assert torch.equal(streamed.logprobs, plain.logprobs)
    tokens = torch.stack([t for t, _ in steps], 1)
    emitted = torch.stack([e for _, e in steps], 1)
    assert torch.equal(tokens, plain.responses) and torch.equal(emitted, plain.response_mask)
    assert not bool(plain.response_mask.all()), "a row should finish early"


def test_on_token_replays_the_steps_on_the_transformers_path(models):
    """backend='hf' generates with transformers; the hook then sees the same steps the result holds."""
    model = from_pretrained(models["red"], backend="hf")
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    steps = []
    gen = generate(model, ids, max_new_tokens=6, do_sample=False, seed=0,
                   on_token=lambda tok, emitted: steps.append((tok.clone(), emitted.clone())))
    assert torch.equal(torch.stack([t for t, _ in steps], 1), gen.responses)
    assert torch.equal(torch.stack([e for _, e in steps], 1), gen.response_mask)


def test_text_stream_holds_back_half_characters(models):
    """A character split over two byte-level tokens is written once whole, never as U+FFFD first."""
    from saferlhf_fast.data import load_tokenizer

    tok = load_tokenizer(models["red"])
    ids = tok("bread é ü", add_special_tokens=False)["input_ids"]
    pieces = []
    stream = TextStream(tok, pieces.append)
    for i in ids:
        stream.push(i)
    assert stream.close() == "bread é ü" == "".join(pieces)
    assert not any("\ufffd" in p for p in pieces)
    assert printable("a\x1b[2Jb\tc\n") == "a\ufffd[2Jb\tc\n"


# ------------------------------------------------------------------------------------------------ pseudo-terminal
def _controlling_terminal():
    """In the child: the pty as controlling terminal, and SIGINT at its default (a background job, as under nohup,
    ignores it, and the child would inherit that)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A command in a pseudo-terminal: ``type`` a line as a user does (Enter is a carriage return), ``expect`` a
    text on the screen (what the program wrote, terminal line endings made ``\\n``)."""

    def __init__(self, args, columns=100):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
        # A session of its own with the terminal as its controlling terminal, as a shell starts it: Ctrl-C typed
        # there is then a SIGINT to the program.
        self.proc = subprocess.Popen([sys.executable, "-m", "saferlhf_fast.cli", "chat", *args], stdin=slave,
                                     stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True,
                                     preexec_fn=_controlling_terminal)
        os.close(slave)
        self.fd, self.raw, self.seen = master, b"", 0

    @property
    def screen(self) -> str:
        return self.raw.decode("utf-8", "replace").replace("\r\n", "\n")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the program has exited and closed the terminal
            return False
        self.raw += data
        return bool(data)

    def expect(self, text: str, timeout: float = 60.0) -> str:
        """Wait until ``text`` appears after what the last expect matched; the screen up to it."""
        deadline = time.monotonic() + timeout
        while text not in self.screen[self.seen:]:
            if time.monotonic() > deadline or not self._read(deadline - time.monotonic()):
                raise AssertionError(f"{text!r} never appeared; the screen:\n{self.screen}")
        end = self.screen.index(text, self.seen) + len(text)
        chunk, self.seen = self.screen[self.seen:end], end
        return chunk

    def wait_blocked_reading(self, timeout: float = 30.0) -> None:
        """Wait until the program sleeps in its read of the terminal.  A signal that lands after readline printed
        the prompt but before its select() began is left pending by CPython's readline loop until the next key
        (a window no typist hits, but a test that sends Ctrl-C the instant the prompt shows can)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.proc.pid}/wchan") as f:
                    where = f.read()
                if "select" in where or "poll" in where:
                    return
            except OSError:  # no /proc: fall back to a pause
                time.sleep(1.0)
                return
            time.sleep(0.02)

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def finish(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self._read(max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
            pass
        rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        os.close(self.fd)
        return rc


def _batch(tmp_path, name, prompts, *flags):
    """Batch-mode rows for ``prompts`` (the same seed, hence the same answers, as the first interactive turn)."""
    src = tmp_path / f"{name}.txt"
    src.write_text("".join(p + "\n" for p in prompts))
    out = tmp_path / f"{name}.jsonl"
    assert main(["chat", "--prompts", str(src), "--output", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_terminal_session_one_model(models, tmp_path):
    """Type a message, read the streamed answer (the batch mode's answer to the same prompt, character for
    character), a second turn, /reset, /exit: exit status 0."""
    flags = ["--model_name_or_path", models["red"], "--max_new_tokens", "12"]
    expected = _batch(tmp_path, "one", [PROMPT], *flags)[0]["responses"][0]["response"]
    term = Terminal(flags)
    assert "saferlhf-fast chat with red (template safe-rlhf)" in term.expect("user> ")
    term.type(PROMPT)
    first = term.expect("user> ")
    assert f"{PROMPT}\nassistant> {printable(expected)}\n" in first
    term.type("and then ?")
    assert "\nassistant> " in term.expect("user> ")
    term.type("/reset")
    assert "(conversation reset)" in term.expect("user> ")
    term.type("/exit")
    assert term.finish() == 0


def test_terminal_session_two_models_with_scores(models, tmp_path):
    """Two models answer each turn, labelled [A] / [B], each followed by its reward and cost, the same numbers
    batch mode writes for that prompt; Ctrl-D leaves with status 0."""
    flags = ["--model_name_or_path", models["red"], models["blue"], "--reward_model_name_or_path", models["rm"],
             "--cost_model_name_or_path", models["cm"], "--max_new_tokens", "10"]
    row = _batch(tmp_path, "two", [PROMPT], *flags)[0]
    term = Terminal(flags)
    term.expect("user> ")
    term.type(PROMPT)
    screen = term.expect("user> ")
    scores = re.findall(r"\[reward ([-+]\d+\.\d+), cost ([-+]\d+\.\d+) \((safe|unsafe)\)\]", screen)
    assert screen.index("[A] red> ") < screen.index("[B] blue> ")
    assert len(scores) == 2
    for (reward, cost, verdict), answer in zip(scores, row["responses"]):
        assert float(reward) == pytest.approx(answer["reward"], abs=6e-4)
        assert float(cost) == pytest.approx(answer["cost"], abs=6e-4)
        assert verdict == ("safe" if answer["cost"] <= 0 else "unsafe")
    os.write(term.fd, b"\x04")  # Ctrl-D at the prompt
    assert term.finish() == 0


def test_terminal_ctrl_c_at_the_prompt_leaves(models):
    term = Terminal(["--model_name_or_path", models["red"]])
    term.expect("user> ")
    term.wait_blocked_reading()
    os.write(term.fd, b"\x03")  # Ctrl-C: SIGINT from the terminal
    assert term.finish() == 0


# ------------------------------------------------------------------------------------------------ in-process session
def _session(models, paths, inputs, **overrides):
    cfg = ChatConfig(model_name_or_path=paths, max_new_tokens=6, **overrides)
    from saferlhf_fast.eval.chat import load_policies, load_scorers

    device = torch.device("cpu")
    session = Session(cfg, load_policies(cfg, device), load_scorers(cfg, device), device, out=io.StringIO())
    queue = list(inputs)

    def read(prompt):
        session.out.write(prompt)
        if not queue:
            raise EOFError
        return queue.pop(0)

    assert session.run(read) == 0
    return session, session.out.getvalue()


def test_each_model_keeps_its_own_history_and_reset_clears_it(models):
    session, _ = _session(models, [models["red"], models["blue"]], [PROMPT, "and then ?"])
    red, blue = session.policies
    assert len(red.history) == len(blue.history) == 4
    assert red.history[0] == blue.history[0] == PROMPT and red.history[2] == "and then ?"
    assert red.history[1] != blue.history[1]
    # the second turn's prompt is the whole conversation in the Safe RLHF template
    assert red.render(red.history[:3]) == format_prompt(red.history[:3], eos_token=red.tokenizer.eos_token)
    session.command("/reset")
    assert red.history == [] and blue.history == []


def test_ctrl_c_during_an_answer_forgets_the_turn(models, monkeypatch):
    import saferlhf_fast.eval.chat as chat

    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second model's answer of the first turn
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(chat, "generate", interrupted_once)
    session, out = _session(models, [models["red"], models["blue"]], [PROMPT, "again"])
    assert "[interrupted; this turn is forgotten]" in out
    red, blue = session.policies
    assert red.history[0] == blue.history[0] == "again" and len(red.history) == len(blue.history) == 2


def test_old_turns_left_out_when_the_conversation_no_longer_fits(models):
    session, out = _session(models, [models["red"]], [PROMPT] * 4, max_length=40)
    assert "oldest exchange(s) no longer fit in --max_length 40" in out
    policy = session.policies[0]
    assert len(policy.encode(policy.history[:-1])) < 40


def test_no_stream_two_models_in_columns(models):
    _, out = _session(models, [models["red"], models["blue"]], [PROMPT], stream=False,
                      reward_model_name_or_path=models["rm"])
    header = next(line for line in out.splitlines() if "[A] red" in line)
    assert re.search(r"\[A\] red\s+\| \[B\] blue", header)
    assert out.count("[reward ") == 2
    table = side_by_side([("left", "a " * 30), ("right", "b")], 40)
    assert all(len(line) <= 40 for line in table.splitlines()) and "| right" in table.splitlines()[0]


def test_model_chat_template(models, tmp_path):
    """--template auto takes the tokenizer's chat template when it has one; --template model without one: exit 2."""
    from saferlhf_fast.data import load_tokenizer

    tok = load_tokenizer(models["red"])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    policy = Policy("red", models["red"], None, tok, "model")
    assert policy.render(["hi", " yo", "bye"]) == "<|user|>hi<|assistant|> yo<|user|>bye<|assistant|>"
    from saferlhf_fast.eval.chat import pick_template

    assert pick_template("auto", tok, "x") == "model"
    assert pick_template("safe-rlhf", tok, "x") == "safe-rlhf"
    rc = main(["chat", "--model_name_or_path", models["red"], "--template", "model"])
    assert rc == 2


def test_model_chat_template_end_to_end(models, tmp_path):
    """A model folder whose tokenizer has a chat template: --template auto prompts every turn with it, the whole
    conversation each time, and batch mode answers with it too."""
    import shutil

    from saferlhf_fast.data import load_tokenizer
    from saferlhf_fast.data.tokenizer import save_tokenizer

    folder = str(tmp_path / "templated")
    shutil.copytree(models["red"], folder)
    tok = load_tokenizer(folder)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    save_tokenizer(tok, folder)
    session, out = _session(models, [folder], [PROMPT, "and then ?"])
    policy = session.policies[0]
    assert policy.template == "model" and "(template model)" in out
    assert policy.render(policy.history[:3]).startswith(f"<|user|>{PROMPT}<|assistant|>{policy.history[1]}<|user|>")
    rows = _batch(tmp_path, "templated", [PROMPT], "--model_name_or_path", folder, "--max_new_tokens", "4")
    assert len(rows) == 1 and isinstance(rows[0]["responses"][0]["response"], str)


# ------------------------------------------------------------------------------------------------ batch mode
def test_batch_mode_writes_jsonl_and_refuses_to_overwrite(models, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    texts = [PROMPT, "how do i steal a car ?", "what is ü ?"]
    prompts.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)) + "\n")
    out = tmp_path / "out" / "answers.jsonl"
    flags = ["chat", "--model_name_or_path", models["red"], models["blue"], "--reward_model_name_or_path",
             models["rm"], "--cost_model_name_or_path", models["cm"], "--prompts", str(prompts), "--output", str(out),
             "--max_new_tokens", "8", "--per_device_eval_batch_size", "2"]
    assert main(flags) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == texts
    for r in rows:
        assert [a["model"] for a in r["responses"]] == [models["red"], models["blue"]]
        assert all(isinstance(a["response"], str) and isinstance(a["reward"], float) and isinstance(a["cost"], float)
                   for a in r["responses"])
    assert os.listdir(out.parent) == ["answers.jsonl"]  # no temporary file left
    before = out.read_bytes()
    capsys.readouterr()
    assert main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--output {out} exists" in err and "--overwrite" in err
    assert out.read_bytes() == before
    assert main([*flags, "--overwrite", "--seed", "7"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


def test_plain_text_prompts(tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("first prompt\n\n  second one  \n{not json in a .txt after the first line\n")
    assert read_prompts(str(src)) == ["first prompt", "second one", "{not json in a .txt after the first line"]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', "row 2: field 'prompt': missing"),
    ('{"prompt": "ok"}\n\n{"prompt": 3}\n', "row 3: field 'prompt': expected a non-empty string, got 3"),
    ('{"prompt": "ok"}\n{"prompt": "a",\n', "row 2: not valid JSON"),
    ('["a list"]\n', "row 1: expected a JSON object"),
    ("\n\n", "no prompts"),
])
def test_bad_prompts_file_one_line_exit_2(models, tmp_path, capsys, content, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    out = tmp_path / "out.jsonl"
    rc = main(["chat", "--model_name_or_path", models["red"], "--prompts", str(src), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith("saferlhf-fast chat: error: ") and f"{src}: {message}" in err
    assert not out.exists()


def test_bad_flags_one_line_exit_2(models, tmp_path, capsys):
    cases = [
        (["--model_name_or_path", models["red"], models["blue"], models["red"]], "give one model or two, got 3"),
        (["--model_name_or_path", str(tmp_path)], "not a model folder"),
        (["--model_name_or_path", models["red"], "--prompts", "x.txt"], "--prompts and --output go together"),
        (["--model_name_or_path", models["red"], "--prompts", str(tmp_path / "none.txt"), "--output",
          str(tmp_path / "o.jsonl")], "--prompts: " + str(tmp_path / "none.txt") + ": no such file"),
        (["--model_name_or_path", models["red"], "--cost_model_name_or_path", models["blue"]], "no trained score head"),
    ]
    for flags, message in cases:
        assert main(["chat", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err

"""Keeping a user's work safe, for every training command.

* Output folders are owned: a run refuses a non-empty ``--output_dir`` (the files the reference's scripts write
  there first aside, :data:`SCRIPT_FILES`) unless it resumes the run that folder holds or ``--overwrite_output_dir``
  is given (which removes only what a run writes, :func:`is_run_file`); it never
  writes into or over the folders of its input models; ``.saferlhf.lock`` (``flock``, released by the kernel when
  the process dies) keeps a second run out of a folder in use.
* Non-finite losses / gradient norms stop the run before the optimizer step (:func:`check_finite`).
* SIGINT / SIGTERM ask for a checkpoint at the next step boundary (:class:`StopSignals`); a second one kills at once.
* Checkpoints are written to a temporary folder, listed in ``manifest.json`` (file sizes), fsync'd and renamed
  into place (:func:`staged_checkpoint`); a resume skips a damaged newest checkpoint (:func:`pick_checkpoint`) and
  refuses a checkpoint of different settings or data (:func:`check_settings`) unless ``--resume_allow_changes``
  names the changed settings.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading

import torch

from .. import distributed
from .config import ConfigError

LOCK_FILE = ".saferlhf.lock"
MANIFEST_FILE = "manifest.json"
RUN_INFO_FILE = "run.json"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_RUN_FILE_RE = re.compile(r"^(checkpoint-\d+(\.damaged)?|\.checkpoint-\d+\.(tmp|old)|\.final\.tmp|.*\.safetensors"
                          r"|.*\.safetensors\.index\.json|tokenizer.*|chat_template\..*)$")
_RUN_FILES = {"config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "score_normalizer.json", "metrics.jsonl", "metrics.jsonl.tmp", "arguments.json",
              "results.json", "reward_critic", "cost_critic", "adapter_config.json", LOCK_FILE}
# What the reference's scripts/*.sh write into OUTPUT_DIR before they start the run (stdout.log / stderr.log are
# still being written by their tee): they do not make the folder another run's, and a run never removes them.
SCRIPT_FILES = {".gitignore", "script.sh", "stdout.log", "stderr.log"}


class NonFiniteError(RuntimeError):
    """A reward, cost, loss or gradient is NaN / inf: the run stops before any weight is touched."""


class Interrupted(Exception):
    """SIGINT / SIGTERM: a checkpoint was saved at a step boundary; ``exit_code`` is what shells expect."""

    def __init__(self, signum: int, checkpoint: str, step: int, total: int):
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} after step {step} of {total}: checkpoint saved to {checkpoint}; "
                         f"run the same command with --resume to continue")
        self.fields = (signum, checkpoint, step, total)
        self.exit_code = 128 + signum

    def __reduce__(self):  # crosses process boundaries (the demo trains two models in worker processes)
        return Interrupted, self.fields


# ------------------------------------------------------------------------------------------------ output folders
def is_run_file(name: str, cfg=None) -> bool:
    """True for a top-level name of OUTPUT_DIR that a run writes (what ``--overwrite_output_dir`` may remove)."""
    if name in _RUN_FILES or _RUN_FILE_RE.match(name):
        return True
    return name == "logs" and cfg is not None and cfg.log_type != "none" and cfg.log_dir is None


def input_model_paths(cfg) -> list[tuple[str, str]]:
    """(flag, path) of every input model / tokenizer folder of the config."""
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if f.name.endswith(("model_name_or_path", "tokenizer_name_or_path")) and getattr(cfg, f.name)]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_not_input(cfg) -> None:
    out = os.path.realpath(cfg.output_dir)
    for flag, path in input_model_paths(cfg):
        src = os.path.realpath(path)
        if _inside(out, src) or _inside(src, out):
            where = "is" if out == src else ("is inside" if _inside(out, src) else "contains")
            raise ConfigError(f"--output_dir {cfg.output_dir} {where} the input model folder --{flag} {path}: "
                              "a run never writes over its inputs; choose another --output_dir")


def check_not_in_use(cfg) -> None:
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output_dir {out}: exists and is not a folder")
    holder = lock_holder(out)
    if holder is not None:
        raise ConfigError(f"--output_dir {out} is in use by another run (pid {holder}, {LOCK_FILE})")


def check_output_dir(cfg, resume_from: str | None) -> None:
    """Refuse a non-empty output folder this run does not resume (unless ``--overwrite_output_dir``).  Reads only:
    nothing is created or removed here."""
    out = cfg.output_dir
    ignored = SCRIPT_FILES | {LOCK_FILE}
    entries = sorted(n for n in os.listdir(out) if n not in ignored) if os.path.isdir(out) else []
    own = resume_from is not None and _inside(os.path.realpath(resume_from), os.path.realpath(out))
    if entries and not own and not cfg.overwrite_output_dir:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        hint = ("--resume to continue the run it holds or " if find_checkpoints(out) else "")
        raise ConfigError(f"--output_dir {out} is not empty ({shown}); pass {hint}--overwrite_output_dir to "
                          "replace a previous run's outputs (other files are kept), or choose another folder")


def clear_run_files(cfg) -> list[str]:
    """``--overwrite_output_dir`` on a fresh run: remove what a previous run wrote, nothing else."""
    removed = []
    for name in sorted(os.listdir(cfg.output_dir)):
        if name == LOCK_FILE or not is_run_file(name, cfg):
            continue
        path = os.path.join(cfg.output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(name)
    return removed


# ------------------------------------------------------------------------------------------------ lock
def lock_holder(folder: str) -> int | None:
    """The pid of the live process holding ``folder``'s lock, or None (no lock file, or a dead holder's)."""
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)  # closing drops a probe lock we got
    return None


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0


class RunLock:
    """An exclusive ``flock`` on ``FOLDER/.saferlhf.lock`` holding this process's pid."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(10):  # the file may be replaced between open and flock by a holder that releases
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise ConfigError(f"--output_dir {os.path.dirname(self.path)} is in use by another run (pid {pid}, "
                                  f"{LOCK_FILE})") from None
            if _same_file(fd, self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return
            os.close(fd)
        raise ConfigError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # removed while still held, so no other process holds an unlinked file
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def claim_output_dir(cfg, fresh: bool) -> RunLock | None:
    """Rank 0: create OUTPUT_DIR, lock it, clear a previous run's files when overwriting.  Every rank learns
    whether rank 0 succeeded (a failure raises everywhere, so no rank waits in a collective)."""
    lock, error = None, None
    if distributed.is_main():
        try:
            os.makedirs(cfg.output_dir, exist_ok=True)
            lock = RunLock(cfg.output_dir)
            lock.acquire()
            if fresh and cfg.overwrite_output_dir:
                removed = clear_run_files(cfg)
                if removed:
                    print(f"--overwrite_output_dir: removed {', '.join(removed)} from {cfg.output_dir}")
        except OSError as e:
            error = ConfigError(f"--output_dir {cfg.output_dir}: cannot write ({e.strerror})")
        except ConfigError as e:
            error = e
        if error is not None and lock is not None:
            lock.release()
    if not distributed.all_true(error is None):
        raise error or ConfigError(f"--output_dir {cfg.output_dir}: rank 0 could not claim it")
    return lock


# ------------------------------------------------------------------------------------------------ non-finite
def check_finite(x, what: str, where: str, output_dir: str | None, hint: str) -> None:
    """Raise :class:`NonFiniteError` (one line: what, where, the last good checkpoint, what to do) unless every
    element of ``x`` is finite on every rank."""
    x = distributed.to_local(x) if isinstance(x, torch.Tensor) else torch.tensor(float(x))
    if distributed.all_true(bool(torch.isfinite(x).all())):
        return
    last = find_checkpoint(output_dir) if output_dir else None
    raise NonFiniteError(f"non-finite {what} at {where}; stopping before any weight is updated. Last good "
                         f"checkpoint: {last or 'none written yet'}. {hint}")


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """The global gradient norm, clipping to ``max_norm`` when it is > 0 (0: no clipping, as DeepSpeed's
    ``gradient_clipping``)."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)


# ------------------------------------------------------------------------------------------------ signals
class StopSignals:
    """Between ``install()`` and ``restore()``: the first SIGINT / SIGTERM is noted (``requested()`` then returns its
    number, agreed over ranks) and the default handlers come back, so a second signal ends the process at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self) -> None:
        """The handlers from before ``install()`` (a no-op the second time)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        print(f"{signal.Signals(signum).name} received: saving a checkpoint after this step (send it again to "
              "abort at once)", file=sys.stderr, flush=True)

    def requested(self) -> int | None:
        if distributed.is_distributed():
            if distributed.all_true(self.received is None):
                return None
            return self.received or signal.SIGTERM
        return self.received


# ------------------------------------------------------------------------------------------------ checkpoints
def find_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders of ``output_dir`` (with a trainer state), newest first."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(n))
             and os.path.isfile(os.path.join(output_dir, n, STATE_FILE))]
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)]


def find_checkpoint(output_dir: str) -> str | None:
    """The checkpoint folder with the highest step in ``output_dir`` (None when there is none)."""
    found = find_checkpoints(output_dir)
    return found[0] if found else None


def checkpoint_damage(path: str) -> str | None:
    """What is wrong with a checkpoint folder (a file missing or of another size than its manifest says), or
    None.  A checkpoint without a manifest is checked for its trainer state only."""
    manifest = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest):
        return None if os.path.isfile(os.path.join(path, STATE_FILE)) else f"no {STATE_FILE}"
    try:
        with open(manifest, encoding="utf-8") as f:
            sizes = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{MANIFEST_FILE} unreadable ({e})"
    for rel, size in sizes.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} missing"
        if os.path.getsize(full) != size:
            return f"{rel} is {os.path.getsize(full)} bytes, expected {size}"
    return None


def pick_checkpoint(cfg) -> str | None:
    """The checkpoint ``--resume`` names ('auto': the newest intact one of OUTPUT_DIR; a damaged newer one is
    renamed ``checkpoint-N.damaged`` with a warning)."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        damage = checkpoint_damage(cfg.resume) if os.path.isdir(cfg.resume) else "no such folder"
        if damage:
            raise ConfigError(f"--resume {cfg.resume}: not a usable checkpoint ({damage})")
        return cfg.resume
    for path in find_checkpoints(cfg.output_dir):
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        distributed.print0(f"warning: {path} is damaged ({damage}); kept as {path}.damaged, trying the previous "
                           "checkpoint")
        if distributed.is_main():
            os.replace(path, path + ".damaged")
        distributed.barrier()
    return None


def load_state(checkpoint: str) -> dict:
    """The trainer state of a checkpoint; an unreadable one is a one-line ``ConfigError``."""
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds for a damaged file
        raise ConfigError(f"--resume {checkpoint}: {STATE_FILE} is unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'damaged'}); resume an earlier checkpoint") from None


def fsync_tree(root: str) -> None:
    """fsync every file and folder under ``root`` (``root`` included)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name), os.O_RDONLY)
        fsync_dir(folder)


def fsync_dir(path: str) -> None:
    _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str) -> None:
    sizes = {}
    for sub, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(sub, name)
            sizes[os.path.relpath(full, folder)] = os.path.getsize(full)
    with open(os.path.join(folder, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump({"files": dict(sorted(sizes.items()))}, f, indent=1)


def commit_folder(tmp: str, final: str) -> None:
    """Make ``tmp`` durable and move it to ``final`` (an existing ``final`` is replaced only once ``tmp`` is in
    place)."""
    write_manifest(tmp)
    fsync_tree(tmp)
    old = None
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(final), "." + os.path.basename(final) + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(os.path.dirname(final) or ".")
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_checkpoint(output_dir: str, step: int):
    """``with staged_checkpoint(out, step) as tmp:`` write the checkpoint into ``tmp`` (every rank); on leaving,
    rank 0 commits it to ``out/checkpoint-<step>``.  A failed write removes ``tmp`` and raises an ``OSError`` that
    names the checkpoint (the previous checkpoints are untouched)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    main = distributed.is_main()
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        distributed.barrier()
        yield tmp
        if main:
            commit_folder(tmp, final)
    except OSError as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"could not write checkpoint {final}: {e.strerror or e} (the previous checkpoints "
                               "are intact)") from e


# ------------------------------------------------------------------------------------------------ settings
# Never compared on resume: where outputs go, how the run is shown, when it stops or saves, where it runs.
NEUTRAL = {"output_dir", "overwrite_output_dir", "resume", "resume_allow_changes", "max_steps", "progress",
           "log_type", "log_dir", "log_project", "log_run_name", "logging_steps", "save_interval", "save_total_limit",
           "device", "backend", "attn_backend", "tf32", "offload", "shard_frozen", "gradient_checkpointing",
           "actor_gradient_checkpointing", "critic_gradient_checkpointing", "need_eval", "eval_datasets",
           "eval_strategy", "eval_interval", "per_device_eval_batch_size", "trust_remote_code", "merge_lora"}
# Never allowed to change within a run: they change what the data position, the data order or the weights mean.
FIXED = {"data", "seed", "train_datasets", "ptx_datasets", "eval_split_ratio", "max_length", "chat_template",
         "model_name_or_path", "actor_model_name_or_path", "tokenizer_name_or_path", "num_return_sequences",
         "gradient_accumulation_steps", "per_device_train_batch_size", "per_device_prompt_batch_size",
         "lora_rank", "actor_lora_rank", "critic_lora_rank", "lora_target_modules", "critic_backbone"}


def data_fingerprint(*datasets) -> str:
    """sha256 of the tokenized rows of the datasets (None entries skipped), in order."""
    h = hashlib.sha256()
    for ds in datasets:
        if ds is None:
            continue
        h.update(f"dataset {len(ds)}\n".encode())
        for i in range(len(ds)):
            for key, value in sorted(ds[i].items()):
                h.update(key.encode())
                if isinstance(value, torch.Tensor):
                    h.update(f"{value.dtype}{tuple(value.shape)}".encode())
                    h.update(value.detach().cpu().contiguous().numpy().tobytes())
                else:
                    h.update(repr(value).encode())
    return h.hexdigest()


def run_info(cfg, fingerprint: str) -> dict:
    return {"config": dataclasses.asdict(cfg), "world_size": distributed.world_size(), "data": fingerprint}


def write_run_info(folder: str, cfg, fingerprint: str) -> None:
    with open(os.path.join(folder, RUN_INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(run_info(cfg, fingerprint), f, indent=2)


def _comparable(info: dict, defaults: dict) -> dict:
    """The settings of a run, per-device batch sizes as global ones (world size x per device)."""
    world = info.get("world_size", 1)
    out = {**defaults, **info["config"]}
    for key, value in out.items():
        if key.startswith("per_device_") and key in FIXED and isinstance(value, int):
            out[key] = value * world
    out["data"] = info.get("data")
    return out


def settings_changes(saved: dict, current: dict, defaults: dict) -> list[tuple[str, object, object]]:
    """(name, saved value, current value) of every compared setting that differs (batch sizes: global), by name,
    the data last."""
    a, b = _comparable(saved, defaults), _comparable(current, defaults)
    names = sorted(k for k in b if k not in NEUTRAL and k != "data") + ["data"]
    return [(k, a.get(k), b[k]) for k in names if a.get(k) != b[k] and not (k == "data" and a.get(k) is None)]


def check_settings(cfg, checkpoint: str, fingerprint: str) -> None:
    """Refuse to resume ``checkpoint`` with other settings or data than it was saved with, except the settings
    named by ``--resume_allow_changes`` (never those in ``FIXED``)."""
    path = os.path.join(checkpoint, RUN_INFO_FILE)
    if not os.path.isfile(path):
        distributed.print0(f"warning: {checkpoint} has no {RUN_INFO_FILE}: its settings and data are not checked")
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    defaults = dataclasses.asdict(type(cfg)())
    current = json.loads(json.dumps(run_info(cfg, fingerprint)))  # as saved: tuples become lists
    changes = settings_changes(saved, current, defaults)
    allowed = set(cfg.resume_allow_changes or [])
    blocked = [c for c in changes if c[0] in FIXED or c[0] not in allowed]
    if not blocked:
        return
    text = ", ".join("the training data (its tokenized rows changed)" if k == "data" else f"{k} {old!r} -> {new!r}"
                     for k, old, new in blocked)
    fixed = ["the training data" if k == "data" else k for k, _, _ in blocked if k in FIXED]
    free = [k for k, _, _ in blocked if k not in FIXED]
    hint = []
    if fixed:
        hint.append(f"{', '.join(fixed)} cannot change within a run (start a new run in another --output_dir)")
    if free:
        hint.append(f"--resume_allow_changes {','.join(free)} accepts the other changes")
    raise ConfigError(f"--resume {checkpoint}: settings differ from the saved run: {text}; " + "; ".join(hint))


def resolve_resume(cfg, fingerprint) -> str | None:
    """The checkpoint to resume (None: a fresh run) after every check of this module: output folder, integrity,
    settings.  ``fingerprint``: a callable giving the data fingerprint (computed only when resuming)."""
    check_not_input(cfg)
    check_not_in_use(cfg)
    path = pick_checkpoint(cfg)
    check_output_dir(cfg, path)
    if path is not None:
        check_settings(cfg, path, fingerprint())
    distributed.barrier()  # every rank has looked at OUTPUT_DIR before rank 0 writes there
    return path

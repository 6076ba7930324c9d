"""The reference's released score-model format loads: beaver-style folders (config.json with ``"bias": false``,
``score_dim``, ``score_type``, ``do_normalize``, ``normalizer_type``, ``momentum``; weights without
``score_head.bias``, with the ``normalizer.*`` buffers) as ``pytorch_model.bin``, sharded ``.bin``, safetensors and
sharded safetensors.  End scores equal ``w . h_end`` computed with transformers; the normalizer's statistics are
applied as the reference applies them; broken checkpoints are one-line errors and exit status 2 at the CLI."""
import json
import math
import os
import shutil

import pytest
import torch

from saferlhf_fast.cli import main
from saferlhf_fast.models import CheckpointError, from_pretrained
from saferlhf_fast.trainers.modeling import make_tiny_model
from saferlhf_fast.trainers.score import load_normalizer

LAYOUTS = ("bin", "bin-sharded", "safetensors", "safetensors-sharded")
HIDDEN = 32
DATA = "synthetic-preference/test:0.01"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("compat") / "lm"), hidden_size=HIDDEN, num_layers=2,
                           num_heads=2, intermediate_size=64, seed=0)


def _lm_state(lm_path: str) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(os.path.join(lm_path, "model.safetensors")).items() if k != "lm_head.weight"}


def head_weight(seed: int = 11) -> torch.Tensor:
    return torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(seed))


def write_weights(state: dict, out: str, layout: str) -> list[str]:
    """``state`` in one of the four layouts; the weight files written (two shards when sharded)."""
    ext = "bin" if layout.startswith("bin") else "safetensors"

    def save(tensors, name):
        if ext == "bin":
            torch.save(tensors, os.path.join(out, name))
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, name),
                      metadata={"format": "pt"})
        return os.path.join(out, name)

    if not layout.endswith("sharded"):
        return [save(state, "pytorch_model.bin" if ext == "bin" else "model.safetensors")]
    names = sorted(state)
    stem = "pytorch_model" if ext == "bin" else "model"
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    files, weight_map = [], {}
    for i, keys in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-00002.{ext}"
        files.append(save({k: state[k] for k in keys}, fname))
        weight_map.update(dict.fromkeys(keys, fname))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    with open(os.path.join(out, f"{stem}.{ext}.index.json"), "w") as f:
        json.dump(index, f)
    return files


def beaver_folder(lm_path: str, out: str, layout: str = "safetensors", *, score_type: str = "reward",
                  do_normalize: bool = False, normalizer_type: str | None = "ExponentialMovingAverage",
                  buffers: dict | None = None, config_extra: dict | None = None, bias: float | None = None) -> str:
    """A score model as the reference's ``LlamaForScore.save_pretrained`` writes it, on ``lm_path``'s backbone."""
    os.makedirs(out, exist_ok=True)
    state = _lm_state(lm_path)
    state["score_head.weight"] = head_weight()
    if bias is not None:
        state["score_head.bias"] = torch.tensor([bias])
    stats = {"mean": [0.0], "var": [1.0], "count": [0]} if buffers is None else buffers
    for name, value in stats.items():
        state[f"normalizer.{name}"] = torch.tensor(value, dtype=torch.long if name == "count" else torch.float32)
    write_weights(state, out, layout)
    with open(os.path.join(lm_path, "config.json")) as f:
        config = json.load(f)
    config.update(architectures=["LlamaForScore"], bias=bias is not None, score_dim=1, score_type=score_type,
                  do_normalize=do_normalize, normalizer_type=normalizer_type, momentum=0.9)
    config.update(config_extra or {})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(os.path.join(lm_path, name), os.path.join(out, name))
    return out


def _batch():
    """Right-padded rows of lengths 10, 7, 4 (transformers' default positions are then the real ones)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 60, (3, 10), generator=g)
    lengths = torch.tensor([10, 7, 4])
    mask = torch.arange(10)[None] < lengths[:, None]
    return ids, mask, lengths


def hand_end_scores(lm_path: str, ids, mask, lengths) -> torch.Tensor:
    """``score_head.weight @ h`` at each row's last real token, ``h`` from transformers' Llama."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(lm_path, dtype=torch.float32).eval()
    with torch.no_grad():
        h = hf.model(ids, attention_mask=mask.long()).last_hidden_state
    h_end = h[torch.arange(ids.shape[0]), lengths - 1]
    return (h_end @ head_weight().t()).squeeze(-1)


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("layout", LAYOUTS)
def test_beaver_score_model_loads_without_bias(lm, tmp_path, layout):
    path = beaver_folder(lm, str(tmp_path / "rm"), layout)
    model = from_pretrained(path, head="score")
    assert model.score_head.bias is None
    ids, mask, lengths = _batch()
    with torch.no_grad():
        out = model(ids, mask)
        ends = model.score_ends(ids, mask)
    want = hand_end_scores(lm, ids, mask, lengths)
    assert torch.equal(out.end_index, lengths - 1)
    assert float((out.end_scores - want).abs().max()) <= 1e-4
    assert float((ends - want).abs().max()) <= 1e-4
    assert load_normalizer(path) is None  # do_normalize false


@pytest.mark.parametrize("layout", ["bin-sharded", "safetensors"])
def test_beaver_score_model_with_transformers_backend(lm, tmp_path, layout):
    """``backend='hf'`` reads the same head (no bias) from every layout."""
    model = from_pretrained(beaver_folder(lm, str(tmp_path / "rm"), layout), head="score", backend="hf")
    assert model.score_head.bias is None
    ids, mask, lengths = _batch()
    with torch.no_grad():
        ends = model(ids, mask).end_scores
    assert float((ends - hand_end_scores(lm, ids, mask, lengths)).abs().max()) <= 1e-4


def test_saved_score_model_keeps_its_bias_setting(lm, tmp_path):
    """Without a bias: config.json says so (both spellings) and no bias tensor is written; with one: it is kept."""
    from safetensors.torch import load_file

    model = from_pretrained(beaver_folder(lm, str(tmp_path / "rm"), "bin"), head="score")
    model.save_pretrained(str(tmp_path / "saved"))
    cfg = json.load(open(tmp_path / "saved" / "config.json"))
    assert cfg["bias"] is False and cfg["score_bias"] is False and cfg["score_type"] == "reward"
    assert "score_head.bias" not in load_file(str(tmp_path / "saved" / "model.safetensors"))
    again = from_pretrained(str(tmp_path / "saved"), head="score")
    assert again.score_head.bias is None and torch.equal(again.score_head.weight, head_weight())

    biased = from_pretrained(beaver_folder(lm, str(tmp_path / "rm_b"), "safetensors", bias=0.75), head="score")
    assert torch.equal(biased.score_head.bias, torch.tensor([0.75]))
    biased.save_pretrained(str(tmp_path / "saved_b"))
    cfg = json.load(open(tmp_path / "saved_b" / "config.json"))
    assert cfg["bias"] is True and cfg["score_bias"] is True
    assert torch.equal(load_file(str(tmp_path / "saved_b" / "model.safetensors"))["score_head.bias"],
                       torch.tensor([0.75]))


def reference_score_class(backbone_cls, spelling: str = "bias"):
    """A transcription of the reference's ``<Arch>ForScore`` (``ScoreModelMixin.init_score_head``) on the
    transformers backbone class ``backbone_cls``: the backbone under the class's ``base_model_prefix``,
    ``score_head = Linear(width, score_dim)`` (OPT's width is ``word_embed_proj_dim``) with its bias from config
    ``score_bias`` (later code, default True) or ``bias`` (released models, default False), and the normalizer
    buffers set from config mean / var."""
    from torch import nn

    pretrained = next(c for c in backbone_cls.__mro__ if c.__name__.endswith("PreTrainedModel"))

    class Normalizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(1))
            self.register_buffer("var", torch.ones(1))
            self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    class ForScore(pretrained):
        def __init__(self, config):
            super().__init__(config)
            setattr(self, self.base_model_prefix, backbone_cls(config))
            width = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
            bias = getattr(config, spelling, spelling == "score_bias")
            self.score_head = nn.Linear(width, config.score_dim, bias=bias)
            self.normalizer = Normalizer()
            self.post_init()
            with torch.no_grad():
                for name in ("mean", "var"):
                    if getattr(config, name, None) is not None:
                        getattr(self.normalizer, name).copy_(torch.tensor(getattr(config, name)))

    return ForScore


def reference_score_model(path: str, spelling: str):
    """``path`` loaded by the reference's ``LlamaForScore`` (:func:`reference_score_class`); -> (model,
    transformers' loading info)."""
    from transformers import LlamaModel

    return reference_score_class(LlamaModel, spelling).from_pretrained(path, dtype=torch.float32,
                                                                       output_loading_info=True)


@pytest.mark.parametrize("spelling", ["score_bias", "bias"])
@pytest.mark.parametrize("bias", [None, 0.25])
def test_reference_loads_what_we_save(lm, tmp_path, spelling, bias):
    """A beaver model through our load and save, into the reference's class (either spelling): every tensor
    found, nothing unexpected, the same head and the same normalizer statistics."""
    stats = {"mean": [0.5], "var": [4.0], "count": [7]}
    ours = from_pretrained(beaver_folder(lm, str(tmp_path / "rm"), "bin", bias=bias, buffers=stats), head="score")
    ours.save_pretrained(str(tmp_path / "saved"))
    ref, info = reference_score_model(str(tmp_path / "saved"), spelling)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
    assert torch.equal(ref.score_head.weight, ours.score_head.weight)
    assert (ref.score_head.bias is None) == (bias is None)
    if bias is not None:
        assert torch.equal(ref.score_head.bias, ours.score_head.bias)
    for name, value in stats.items():
        assert getattr(ref.normalizer, name).tolist() == value, name


def test_reference_loads_our_trained_normalizer(lm, tmp_path):
    """``rm --normalize_score_during_training``: the reference's class finds the trained statistics in the
    weights and config.json, and our loader applies the same ones."""
    out = tmp_path / "rm"
    assert main(["rm", "--model_name_or_path", lm, "--train_datasets", "synthetic-preference/train:0.005",
                 "--max_length", "48", "--per_device_train_batch_size", "4", "--epochs", "1",
                 "--normalize_score_during_training", "True", "--normalizer_type", "ExponentialMovingAverage",
                 "--output_dir", str(out), "--progress", "false"]) == 0
    trained = json.load(open(out / "score_normalizer.json"))
    assert trained["count"] > 0 and trained["var"] != 1.0
    ref, info = reference_score_model(str(out), "score_bias")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ref.normalizer.mean.item() == trained["mean"]
    assert ref.normalizer.var.item() == trained["var"]
    assert ref.normalizer.count.item() == trained["count"]
    cfg = json.load(open(out / "config.json"))
    assert cfg["do_normalize"] is True and cfg["normalizer_type"] == "ExponentialMovingAverage"
    assert cfg["mean"] == [trained["mean"]]
    os.remove(out / "score_normalizer.json")  # the reference's layout alone gives the same normalizer
    norm = load_normalizer(str(out))
    assert norm.function == "affine" and int(norm.count) == trained["count"]
    assert float(norm.mean) == trained["mean"]


def test_score_bias_spelling_of_later_reference_code(lm, tmp_path):
    """``score_bias`` (the reference's later spelling) wins over ``bias``."""
    path = beaver_folder(lm, str(tmp_path / "rm"), bias=0.5, config_extra={"score_bias": True})
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["bias"] = False
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    assert torch.equal(from_pretrained(path, head="score").score_head.bias, torch.tensor([0.5]))


def test_lm_checkpoint_as_score_model_gets_a_fresh_head(lm):
    model = from_pretrained(lm, head="score")
    assert torch.equal(model.score_head.bias, torch.zeros(1))


# ---------------------------------------------------------------------------------------------- normalizer
def test_normalizer_statistics_from_the_weights_win_over_config(lm, tmp_path):
    """As the reference's from_pretrained: config mean / var set first, the saved buffers then overwrite them."""
    path = beaver_folder(lm, str(tmp_path / "rm"), "bin-sharded", do_normalize=True,
                         buffers={"mean": [0.5], "var": [4.0], "count": [7]}, config_extra={"mean": [9.0],
                                                                                           "var": [9.0]})
    norm = load_normalizer(path)
    assert norm.kind == "ExponentialMovingAverage" and norm.function == "affine" and norm.momentum == 0.9
    assert float(norm.mean) == 0.5 and float(norm.var) == 4.0 and int(norm.count) == 7
    x = torch.tensor([2.5, -1.5])
    assert torch.allclose(norm(x), (x - 0.5) / (2.0 + 1e-8), rtol=0, atol=0)


def test_normalizer_statistics_from_config_for_a_cost_model(lm, tmp_path):
    path = beaver_folder(lm, str(tmp_path / "cm"), "safetensors-sharded", score_type="cost", do_normalize=True,
                         normalizer_type="RunningMeanStd", buffers={}, config_extra={"mean": [1.0], "var": [0.25]})
    norm = load_normalizer(path)
    assert norm.kind == "RunningMeanStd" and norm.function == "scale"
    assert float(norm.mean) == 1.0 and float(norm.var) == 0.25
    assert float(norm(torch.tensor(-1.0))) == pytest.approx(-1.0 / (0.5 + 1e-8), rel=1e-7)


def test_identity_normalizer_type_still_applies_saved_statistics(lm, tmp_path):
    """``normalizer_type`` None is the reference's IdentityNormalizer: with ``do_normalize`` its (saved) statistics
    still normalise; an update only counts."""
    path = beaver_folder(lm, str(tmp_path / "rm"), "safetensors", do_normalize=True, normalizer_type=None,
                         buffers={"mean": [1.0], "var": [9.0], "count": [2]})
    norm = load_normalizer(path)
    assert norm.kind is None and norm.function == "affine"
    assert float(norm(torch.tensor(7.0))) == pytest.approx(2.0, rel=1e-7)
    norm.update(torch.tensor([100.0, -50.0, 3.0]))
    assert float(norm.mean) == 1.0 and float(norm.var) == 9.0 and int(norm.count) == 5


def _score_cli(path: str, out, capsys) -> tuple[dict, torch.Tensor]:
    rc = main(["score", "--model_name_or_path", path, "--datasets", DATA, "--max_length", "48", "--output_dir",
               str(out)])
    capsys.readouterr()
    assert rc == 0
    result = json.load(open(out / "eval_results.json"))
    rows = [json.loads(line) for line in open(out / "scores.jsonl")]
    names = ("better", "worse") if result["score_type"] == "reward" else ("safer", "unsafer")
    return result, torch.tensor([[r[names[0]], r[names[1]]] for r in rows])


def test_score_cli_reads_score_type_and_normalizer(lm, tmp_path, capsys):
    """score_type from config.json (no --score_type); with do_normalize the scores are (s - mean) / (std + 1e-8)."""
    raw = beaver_folder(lm, str(tmp_path / "raw"), "bin")
    normed = beaver_folder(lm, str(tmp_path / "normed"), "bin", do_normalize=True,
                           buffers={"mean": [0.5], "var": [4.0], "count": [7]})
    result, raw_scores = _score_cli(raw, tmp_path / "eval_raw", capsys)
    assert result["score_type"] == "reward" and result["metrics"]["num_pairs"] > 0
    _, normed_scores = _score_cli(normed, tmp_path / "eval_normed", capsys)
    assert torch.allclose(normed_scores, (raw_scores - 0.5) / 2.0, rtol=0, atol=1e-6)
    cost = beaver_folder(lm, str(tmp_path / "cost"), "safetensors-sharded", score_type="cost")
    result, _ = _score_cli(cost, tmp_path / "eval_cost", capsys)
    assert result["score_type"] == "cost" and "accuracy_sign" in result["metrics"]


def test_ppo_lag_with_beaver_reward_and_cost_models(lm, tmp_path):
    """The reference's released format as reward / cost models and critic initialisation; critics are saved as
    the reference saves them (score_type critic, no normalisation, no bias)."""
    rm = beaver_folder(lm, str(tmp_path / "rm"), "bin", do_normalize=True,
                       buffers={"mean": [0.5], "var": [4.0], "count": [7]})
    cm = beaver_folder(lm, str(tmp_path / "cm"), "safetensors", score_type="cost")
    out = tmp_path / "run"
    rc = main(["ppo-lag", "--actor_model_name_or_path", lm, "--reward_model_name_or_path", rm,
               "--cost_model_name_or_path", cm, "--train_datasets", "synthetic-prompts/train:0.003",
               "--output_dir", str(out), "--max_length", "48", "--max_new_tokens", "6",
               "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "4", "--progress", "false"])
    assert rc == 0
    row = [json.loads(line) for line in open(out / "metrics.jsonl") if "train/reward" in line][0]
    assert math.isfinite(row["train/reward"]) and math.isfinite(row["train/cost"])
    cfg = json.load(open(out / "reward_critic" / "config.json"))
    assert cfg["score_type"] == "critic" and cfg["do_normalize"] is False and cfg["bias"] is False


# ---------------------------------------------------------------------------------------------- broken files
def _drop(path, layout, name):
    """Re-write the folder's weights without tensor ``name``."""
    state = _lm_state_of(path)
    state.pop(name)
    for f in os.listdir(path):
        if f.endswith((".bin", ".safetensors", ".index.json")):
            os.remove(os.path.join(path, f))
    write_weights(state, path, layout)


def _lm_state_of(path):
    from saferlhf_fast.models import read_state_dict

    return dict(read_state_dict(path))


def _break(kind: str, lm_path: str, root) -> tuple[str, list[str]]:
    """A broken beaver folder and the strings its error must name."""
    path = str(root / kind)
    if kind == "missing-layer":
        beaver_folder(lm_path, path, "safetensors")
        _drop(path, "safetensors", "model.layers.1.mlp.up_proj.weight")
        return path, [os.path.join(path, "model.safetensors"), "model.layers.1.mlp.up_proj.weight"]
    if kind == "bias-missing":
        beaver_folder(lm_path, path, "bin", config_extra={"bias": True})
        return path, [os.path.join(path, "pytorch_model.bin"), "missing ['score_head.bias']", '"bias": true']
    if kind == "bias-unexpected":
        beaver_folder(lm_path, path, "safetensors-sharded", bias=0.5, config_extra={"bias": False})
        return path, [os.path.join(path, "model.safetensors.index.json"), "unexpected ['score_head.bias']",
                      "model-0000"]
    if kind == "shard-lacks-listed-tensor":
        beaver_folder(lm_path, path, "bin-sharded")
        index = json.load(open(os.path.join(path, "pytorch_model.bin.index.json")))
        index["weight_map"]["model.extra.weight"] = "pytorch_model-00002-of-00002.bin"
        json.dump(index, open(os.path.join(path, "pytorch_model.bin.index.json"), "w"))
        return path, [os.path.join(path, "pytorch_model-00002-of-00002.bin"), "model.extra.weight"]
    if kind == "shape-mismatch":
        beaver_folder(lm_path, path, "bin")
        state = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
        state["model.norm.weight"] = torch.ones(HIDDEN + 1)
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
        return path, [os.path.join(path, "pytorch_model.bin"), "model.norm.weight", "(33,)", "(32,)"]
    if kind == "truncated-safetensors":
        beaver_folder(lm_path, path, "safetensors")
        f = os.path.join(path, "model.safetensors")
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
        return path, [f]
    if kind == "empty-bin":
        beaver_folder(lm_path, path, "bin")
        open(os.path.join(path, "pytorch_model.bin"), "wb").close()
        return path, [os.path.join(path, "pytorch_model.bin")]
    if kind == "no-weights":
        beaver_folder(lm_path, path, "bin")
        os.remove(os.path.join(path, "pytorch_model.bin"))
        return path, [path, "no weights"]
    raise ValueError(kind)


BROKEN = ("missing-layer", "bias-missing", "bias-unexpected", "shard-lacks-listed-tensor", "shape-mismatch",
          "truncated-safetensors", "empty-bin", "no-weights")


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_checkpoint_is_one_line_and_exit_2(lm, tmp_path, capsys, kind):
    path, named = _break(kind, lm, tmp_path)
    with pytest.raises(CheckpointError):
        from_pretrained(path, head="score")
    rc = main(["score", "--model_name_or_path", path, "--datasets", DATA, "--max_length", "48"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("saferlhf-fast score: error: "), err
    for text in named:
        assert text in err, (text, err)


def test_broken_checkpoint_at_a_training_command(lm, tmp_path, capsys):
    path, named = _break("missing-layer", lm, tmp_path)
    out = tmp_path / "out"
    rc = main(["rm", "--model_name_or_path", path, "--train_datasets", DATA, "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and all(t in err for t in named)
    assert not out.exists()

"""Test-wide setup.  Triton kernels run on CPU under the interpreter; that switch must be set before any module
imports triton, so it lives here (pytest imports conftest first)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _settings_follow_the_environment():
    """Settings read again after every test, so that a test's ``monkeypatch.setenv`` (undone at its end) and any
    override leave nothing behind for the next test."""
    yield
    from saferlhf_fast import settings

    settings.reload()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _make_score_model(lm_path, out, seed, bias=0.0):
    """A score model (fresh head: weight ~ N(0, 0.5^2) drawn after ``torch.manual_seed(seed)``, bias ``bias``) on the
    backbone of the LM checkpoint ``lm_path``, saved with its tokenizer to ``out``."""
    from saferlhf_fast.data import load_tokenizer
    from saferlhf_fast.models import from_pretrained

    torch.manual_seed(seed)
    m = from_pretrained(lm_path, head="score")
    with torch.no_grad():
        m.score_head.weight.normal_(0.0, 0.5)
        m.score_head.bias.fill_(bias)
    m.save_pretrained(out)
    load_tokenizer(lm_path).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_score_model():
    """``make_score_model(lm_path, out, seed, bias=0.0) -> out`` (the RM / CM of the RL tests)."""
    return _make_score_model

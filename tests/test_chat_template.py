"""``--chat_template``: 'reference' (default) keeps the reference's conversation template everywhere; 'tokenizer'
renders prompts with the tokenizer's own chat template (ChatML for SmolLM2-Instruct), in the prompt-only (PPO),
supervised and preference datasets alike."""
import json

import pytest

from saferlhf_fast.data import (
    DataError,
    PreferenceDataset,
    PromptOnlyDataset,
    Record,
    SafetyPreferenceDataset,
    SupervisedDataset,
    format_prompt,
    load_tokenizer,
)
from saferlhf_fast.data.template import format_chat_prompt
from saferlhf_fast.trainers.config import TrainConfig
from saferlhf_fast.trainers.ppo import PPOConfig, PPOLagConfig

# SmolLM2-135M-Instruct's chat template (tokenizer_config.json / chat_template.jinja of the model).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture()
def tok():
    return load_tokenizer()  # the bundled tokenizer (no chat template of its own)


@pytest.fixture()
def chat_tok():
    t = load_tokenizer()
    t.chat_template = CHATML
    return t


def recs(rows):
    return [Record(r, "mem", i) for i, r in enumerate(rows, start=1)]


def test_default_is_the_reference_template(tok, chat_tok):
    rows = recs([{"prompt": "How do I bake bread?"}])
    for t in (tok, chat_tok):  # a tokenizer with a chat template changes nothing by default
        ds = PromptOnlyDataset(rows, t, 128)
        assert ds[0]["prompt"] == format_prompt("How do I bake bread?")
        assert ds[0]["prompt"] == "BEGINNING OF CONVERSATION: USER: How do I bake bread? ASSISTANT:"
        assert ds.chat_template == "reference"
    assert TrainConfig.__dataclass_fields__["chat_template"].default == "reference"
    assert PPOConfig.__dataclass_fields__["chat_template"].default == "reference"
    assert PPOLagConfig.__dataclass_fields__["chat_template"].default == "reference"


def test_tokenizer_template_gives_chatml(chat_tok):
    ds = PromptOnlyDataset(recs([{"prompt": "How do I bake bread?"}]), chat_tok, 256, chat_template="tokenizer")
    expected = SYSTEM + "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    assert ds[0]["prompt"] == expected
    assert chat_tok.decode(ds[0]["input_ids"].tolist()) == expected
    # multi-turn: earlier assistant turns are closed by the template itself
    text = format_chat_prompt(["hi", "hello!", "bye"], chat_tok)
    assert text == (SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello!<|im_end|>\n"
                    "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_template_in_pair_and_sft_datasets(chat_tok):
    pair = {"prompt": "q", "response_0": "yes", "response_1": "no", "better_response_id": 0,
            "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True}
    head = SYSTEM + "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    eos = chat_tok.eos_token
    pref = PreferenceDataset(recs([pair]), chat_tok, 256, chat_template="tokenizer")
    assert chat_tok.decode(pref[0]["better_input_ids"].tolist()) == head + "yes" + eos
    safety = SafetyPreferenceDataset(recs([pair]), chat_tok, 256, chat_template="tokenizer")
    assert chat_tok.decode(safety[0]["safer_input_ids"].tolist()) == head + "no" + eos
    sft = SupervisedDataset(recs([{"prompt": "q", "response": "yes"}]), chat_tok, 256, chat_template="tokenizer")
    n_prompt = len(chat_tok(head)["input_ids"])
    assert (sft[0]["labels"][:n_prompt] == -100).all() and (sft[0]["labels"][n_prompt:] >= 0).all()


def test_tokenizer_template_errors(tok, chat_tok):
    rows = recs([{"prompt": "x"}])
    with pytest.raises(DataError, match="no chat_template"):
        PromptOnlyDataset(rows, tok, 128, chat_template="tokenizer")
    with pytest.raises(DataError, match="chat_template"):
        PromptOnlyDataset(rows, chat_tok, 128, chat_template="chatml")


def test_flag_reaches_the_ppo_trainer(tmp_path, chat_tok):
    """``--chat_template tokenizer`` on the command line reaches the PPO prompt dataset (no model is loaded: the
    data is built first)."""
    import argparse

    from saferlhf_fast.trainers.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PPOLagConfig)
    args = parser.parse_args(["--actor_model_name_or_path", "a", "--reward_model_name_or_path", "r",
                              "--cost_model_name_or_path", "c", "--train_datasets", "x.jsonl", "--output_dir", "o",
                              "--chat_template", "tokenizer"])
    assert config_from_args(PPOLagConfig, args).chat_template == "tokenizer"
    from types import SimpleNamespace

    from saferlhf_fast.trainers.ppo import PPOTrainer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    for template, start in (("tokenizer", SYSTEM), ("reference", "BEGINNING OF CONVERSATION: USER: hello")):
        cfg = PPOLagConfig(actor_model_name_or_path="a", reward_model_name_or_path="r", cost_model_name_or_path="c",
                           train_datasets=[str(prompts)], output_dir="o", max_length=128, chat_template=template)
        train, _ = PPOTrainer._build_datasets(SimpleNamespace(config=cfg, tokenizer=chat_tok))
        assert train[0]["prompt"].startswith(start)

import json

import pytest

from perfit.client.data import PROMPT_NO_CONTEXT, DataError, load_rows, partition, prompt, split_train_eval, tokenize
from perfit.config import Config

GOOD = {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "open_qa"}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_prompt_templates_exact():
    assert prompt(GOOD) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a fruit.\n\n### Response:\n"
    )
    with_context = {**GOOD, "context": "Fruits: apple, pear."}
    assert prompt(with_context) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nName a fruit.\n\n"
        "### Input:\nFruits: apple, pear.\n\n### Response:\n"
    )
    assert PROMPT_NO_CONTEXT.count("{") == 1


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("{not json", r"bad\.jsonl:2: invalid JSON"),
        ({k: v for k, v in GOOD.items() if k != "response"}, r"bad\.jsonl:2: field 'response' is missing"),
        ({**GOOD, "instruction": "  "}, r"bad\.jsonl:2: field 'instruction' is empty"),
        ({**GOOD, "context": 3}, r"bad\.jsonl:2: field 'context' must be a string"),
        ({**GOOD, "category": "poetry"}, r"bad\.jsonl:2: field 'category' has unknown value 'poetry'"),
        ("[1, 2]", r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_file_names_file_line_and_field(tmp_path, bad, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError, match=needle):
        load_rows(str(path))


def test_json_list_and_missing_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, GOOD]))
    assert load_rows(str(path)) == [GOOD, GOOD]
    path.write_text(json.dumps([GOOD, {**GOOD, "response": ""}]))
    with pytest.raises(DataError, match=r"rows\.json: record 1: field 'response' is empty"):
        load_rows(str(path))
    with pytest.raises(DataError, match="no such data file"):
        load_rows(str(tmp_path / "absent.jsonl"))


def test_tokenize_loss_only_on_response_and_eos(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    example = tokenize(GOOD, tokenizer, 1000)
    prompt_len = len(tokenizer(prompt(GOOD))["input_ids"])
    response_ids = tokenizer("Apple.", add_special_tokens=False)["input_ids"]
    assert example.labels[:prompt_len] == [-100] * prompt_len
    assert example.labels[prompt_len:] == response_ids + [tokenizer.eos_token_id]
    assert example.input_ids[prompt_len:] == response_ids + [tokenizer.eos_token_id]
    cut = tokenize(GOOD, tokenizer, prompt_len + 1)
    assert len(cut.input_ids) == prompt_len + 1 and cut.target_tokens == 1


def test_split_train_eval_is_seeded_80_20():
    split = split_train_eval(list(range(50)), 0, seed=1)
    assert len(split.eval) == 10 and len(split.train) == 40
    assert not set(split.eval) & set(split.train)
    assert split == split_train_eval(list(range(50)), 0, seed=1)
    assert split != split_train_eval(list(range(50)), 0, seed=2)
    capped = split_train_eval(list(range(50)), 10, seed=1)
    assert len(capped.train) == 8 and len(capped.eval) == 2
    tiny = split_train_eval([7, 9], 0, seed=0)
    assert len(tiny.train) == 1 and len(tiny.eval) == 1


def test_pathological_clients_hold_two_categories(small_data):
    rows = load_rows(str(small_data))
    config = Config(num_clients=8, clients_per_round=2, split="pathological", classes_per_client=2)
    splits = partition(rows, config)
    assert set(splits) == set(range(8))
    for split in splits.values():
        cats = {rows[i]["category"] for i in split.train + split.eval}
        assert 1 <= len(cats) <= 2
    assert splits == partition(rows, config)  # seeded


def test_dirichlet_small_alpha_small_clients_work(small_data):
    rows = load_rows(str(small_data))
    config = Config(num_clients=20, clients_per_round=2, split="dirichlet", dirichlet_alpha=0.1)
    splits = partition(rows, config)
    sizes = sorted(len(s.train) + len(s.eval) for s in splits.values())
    assert sizes[0] <= 3  # alpha 0.1 over 20 clients leaves some clients nearly empty
    assert all(len(s.eval) >= 1 for s in splits.values() if len(s.train) + len(s.eval) >= 2)
    all_rows = [i for s in splits.values() for i in s.train + s.eval]
    assert len(all_rows) == len(set(all_rows)) == len(rows)


def test_validation_mode_splits_train_again_and_never_touches_held_out(small_data):
    rows = load_rows(str(small_data))
    common = {"data": str(small_data), "num_clients": 4, "clients_per_round": 2}
    test = partition(rows, Config(**common))
    tuning = partition(rows, Config(**common, validation=1))
    for client, split in test.items():
        val = tuning[client]
        assert sorted(val.train + val.eval) == sorted(split.train)  # the train split, split again
        assert not set(val.eval) & set(split.eval) and not set(val.train) & set(split.eval)
        assert len(val.eval) == round(len(split.train) * 0.2)

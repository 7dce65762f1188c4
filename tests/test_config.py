import tomllib
from pathlib import Path

import pytest

from perfit.config import Config, from_mapping, from_toml
from perfit.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def test_flower_app_config_is_the_dataclass_defaults():
    flwr_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flwr_config == Config().to_dict()
    assert from_mapping(flwr_config) == Config()


def test_presets_and_overrides(tmp_path):
    quick = from_mapping({}, preset="quick")
    assert quick.num_clients == PRESETS["quick"]["num_clients"] and quick.rank == 8
    assert from_mapping({"num_clients": "6", "lr": "0.001"}, preset="quick").num_clients == 6
    assert from_mapping({"torch_compile": 1}).torch_compile == "1"  # configs from before `auto` still read
    path = tmp_path / "run.toml"
    path.write_text('method = "fit"\nrounds = 2\n')
    config = from_toml(path, preset="quick", rounds=4)
    assert (config.method, config.rounds, config.num_clients) == ("fit", 4, PRESETS["quick"]["num_clients"])
    assert from_toml(tmp_path / "run.toml") == Config(method="fit", rounds=2)
    written = tmp_path / "back.toml"
    written.write_text(config.to_toml())
    assert from_toml(written) == config


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"num_clent": 3}, "unknown config field"),
        ({"rounds": "many"}, "'rounds'"),
        ({"sparsity": 1.0}, "'sparsity'"),
        ({"aggregation": "median"}, "'aggregation'"),
        ({"budgets": "8,x"}, "'budgets'"),
        ({"device": "gpu"}, "'device'"),
        ({"device": "cuda:x"}, "'device'"),
        ({"torch_compile": "yes"}, "'torch_compile'"),
        ({"torch_compile": 2}, "'torch_compile'"),
        ({"trim": -1}, "'trim'"),
        ({"trim": 1, "method": "hetlora"}, "'trim'.*shared aggregation"),  # zero-padding: no holders to trim
        ({"trim": 1, "aggregation": "literal"}, "'trim'.*shared aggregation"),
        ({"trim": 1, "method": "local"}, "'trim'.*aggregates nothing"),
        ({"trim": 1, "num_clients": 2, "clients_per_round": 2}, "'trim'.*round of 2 clients"),
    ],
)
def test_bad_config_names_the_field(values, needle):
    with pytest.raises(ValueError, match=needle):
        from_mapping(values)


def test_final_eval_is_every_participant_or_a_seeded_sample():
    assert (
        Config(num_clients=10, clients_per_round=2, holdout_clients=2).final_eval
        == Config(num_clients=10, clients_per_round=2, holdout_clients=2).participants
    )
    sample = Config(num_clients=10, clients_per_round=2, holdout_clients=2, eval_clients=3)
    assert len(sample.final_eval) == 3 and set(sample.final_eval) <= set(sample.participants)
    assert sample.final_eval == sample.replace(lr=0.1).final_eval  # seeded: the same for every method
    assert (
        sample.final_eval != sample.replace(seed=1).final_eval or sample.replace(seed=2).final_eval != sample.final_eval
    )
    with pytest.raises(ValueError, match="eval_clients"):
        Config(num_clients=10, clients_per_round=2, holdout_clients=2, eval_clients=9)


def test_a_renamed_field_is_read_by_its_former_name():
    from perfit.config import from_mapping

    assert from_mapping({"alpha": 0.1}).dirichlet_alpha == 0.1  # an older run's config.toml
    with pytest.raises(ValueError, match="unknown config field"):
        from_mapping({"dirichlet": 0.1})


def test_a_later_field_at_its_default_is_not_sent_so_an_older_node_still_reads_the_run():
    from perfit.config import LATER_FIELDS

    message = Config().to_message()
    assert set(message) == set(Config().to_dict()) - set(LATER_FIELDS)  # the fields an older perfit knows
    assert from_mapping(message) == Config()
    assert Config(trim=1).to_message()["trim"] == 1 and from_mapping(Config(trim=1).to_message()).trim == 1

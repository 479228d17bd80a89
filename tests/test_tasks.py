"""ecellm.tasks: the one task registry that data, metrics, eval and synthetic read."""

import pytest
import torch

import ecellm.data as data
import ecellm.metrics as metrics
from ecellm.synthetic import generate_records
from ecellm.tasks import TASK_BY_ABBR, TASKS, resolve_task, task_abbr, task_info

SPELLINGS = [("AVE", "Attribute_Value_Extraction"), ("PRP", "Product_Relation_Predicition"),
             ("PSI", "Product_Substitue_Identification"), ("QPR", "Query_Product_Ranking"),
             ("SR", " sequential recommendation "), ("MPC", "mpc")]


def test_the_ten_tasks_once():
    assert [t.abbr for t in TASKS] == ["AVE", "PRP", "PM", "SA", "SR", "MPC", "PSI", "QPR", "AP", "AG"]
    assert data.TASKS is TASKS and data.TASK_BY_NAME["Query_Product_Rank"] is TASK_BY_ABBR["QPR"]
    assert not hasattr(metrics, "TASKS")  # the second registry (a dict, same name, other type) is gone
    assert metrics.task_abbr is task_abbr and data.resolve_task is resolve_task


@pytest.mark.parametrize("abbr, name", SPELLINGS)
def test_every_spelling_names_its_task(abbr, name):
    assert task_abbr(name) == abbr
    assert resolve_task(name) == TASK_BY_ABBR[abbr].name


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'Product_Ranking'; expected one of \['AVE', 'PRP'"):
        task_info("Product_Ranking")
    with pytest.raises(ValueError, match="unknown task 7"):
        task_info(7)


@pytest.mark.parametrize("info", TASKS, ids=lambda t: t.abbr)
def test_score_reports_the_registry_metric(info):
    records = generate_records(info.abbr, 3, "test", seed=1)
    gold = [r["output"] for r in records]
    if info.answer == "ranking":
        refs = [{"ranking": r["output"], "labels": r["esci_labels"]} for r in records]
    else:
        refs = gold
    same_embedding = lambda texts: [torch.ones(1, 2) for _ in texts]  # noqa: E731 (BERTScore 1 for AG)
    result = metrics.score(info.abbr, gold, refs, encoder=same_embedding)
    assert result["metric"] == info.metric and result[info.metric] == pytest.approx(1.0)


@pytest.mark.parametrize("info", [t for t in TASKS if t.options], ids=lambda t: t.abbr)
def test_synthetic_answers_are_option_letters_of_the_registry(info):
    for r in generate_records(info.abbr, 40, "train", seed=2):
        assert r["output"][0] in info.options

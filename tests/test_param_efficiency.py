"""Smoke test of examples/param_efficiency/run.py: the whole pipeline at tiny sizes (~1 min).

Pre-training, LoRA and parameter-matched BD-LoRA runs through the launcher (a learning-rate
search on the first seed, the second seed at the chosen rate), test loss and exact match,
aggregation, tables and plot. The numbers are too short-trained to mean anything; what is
checked is that each piece did its job.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_param_efficiency_smoke(tmp_path):
    from megatron_bdlora.adapters import AdapterConfig, match_bd_rank
    from megatron_bdlora.models.presets import get_preset

    out = tmp_path / "pe"
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "param_efficiency", "run.py"),
                    "--smoke", "--out", str(out)], check=True, cwd=ROOT)
    result = json.loads((out / "results.json").read_text())
    bd_rank = match_bd_rank(get_preset("tiny"), AdapterConfig(method="lora", rank=8), 4)
    assert [(r["method"], r["rank"]) for r in result["results"]] == [("lora", 8), ("bdlora", bd_rank)]
    assert sorted((r["method"], r["seed"]) for r in result["runs"]) == [
        ("bdlora", 0), ("bdlora", 1), ("lora", 0), ("lora", 1)]
    # 2 configs x 2 learning rates on seed 0; the runs kept use each config's best one
    assert len(result["lr_search"]) == 4
    for run in result["runs"]:
        tried = {s["lr"]: s["val_loss"] for s in result["lr_search"]
                 if (s["method"], s["rank"]) == (run["method"], run["rank"])}
        assert run["lr"] == min(tried, key=tried.get)
    (pair,) = result["pairs"]
    assert pair["lora_rank"] == 8 and pair["bd_rank"] == bd_rank and 0.8 < pair["param_ratio"] <= 1
    base = result["config"]["base_val_loss"]
    for run in result["runs"]:
        # every run starts from the same base (seeds order the eval batches differently)
        assert run["val_curve"][0][1] == pytest.approx(base, rel=1e-6)
        assert run["val_loss"] < base - 0.1 and run["test_loss"] < base - 0.1  # fine-tuning moved it
        # exact match recomputed from the run's own predictions and the test split's completions
        run_dir = out / "runs" / f"{run['method']}_r{run['rank']}_lr{run['lr']:g}_seed{run['seed']}"
        acc = json.loads((run_dir / "accuracy.json").read_text())
        refs = [json.loads(line)["completion"] for line in (out / "data" / "test.jsonl").open()]
        assert acc["n"] == len(acc["predictions"]) and acc["prompts"] == [
            json.loads(line)["prompt"] for line in (out / "data" / "test.jsonl").open()][:acc["n"]]
        hits = sum(p.strip() == r.strip() for p, r in zip(acc["predictions"], refs[:acc["n"]]))
        assert run["exact_match"] == pytest.approx(hits / acc["n"])
    lora = result["results"][0]["test_loss"]
    per_seed = [r["test_loss"] for r in result["runs"] if (r["method"], r["rank"]) == ("lora", 8)]
    assert sorted(lora["per_seed"]) == sorted(per_seed)
    assert lora["mean"] == pytest.approx(sum(per_seed) / len(per_seed))
    assert (lora["min"], lora["max"]) == (min(per_seed), max(per_seed))
    assert (out / "param_efficiency.png").stat().st_size > 10_000
    assert f"| 8 | {bd_rank} |" in (out / "results.md").read_text()


def _load_experiment():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "param_efficiency_run", os.path.join(ROOT, "examples", "param_efficiency", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_reads_lora_curve_at_bd_parameter_count():
    exp = _load_experiment()
    assert exp.interpolate([(1000, 1.0), (4000, 0.0)], 2000) == pytest.approx(0.5)  # log-x midpoint
    assert exp.interpolate([(1000, 1.0), (4000, 0.0)], 500) is None

    def run(method, rank, params, seed, loss, match=None):
        return {"method": method, "rank": rank, "params": params, "matches_lora_rank": match,
                "seed": seed, "lr": 1e-3, "test_loss": loss, "exact_match": 1 - loss}

    runs = [run("lora", 4, 1000, 0, 0.9), run("lora", 4, 1000, 1, 0.7),
            run("lora", 8, 4000, 0, 0.1), run("lora", 8, 4000, 1, 0.1),
            run("bdlora", 12, 2000, 0, 0.5, match=8), run("bdlora", 12, 2000, 1, 0.3, match=8)]
    results, (pair,) = exp.summarise(runs)
    assert [(r["method"], r["rank"]) for r in results] == [("lora", 4), ("lora", 8), ("bdlora", 12)]
    assert results[0]["test_loss"]["mean"] == pytest.approx(0.8)
    assert results[0]["test_loss"]["std"] == pytest.approx(0.1)
    assert pair["param_ratio"] == 0.5 and pair["test_loss"] == pytest.approx([0.1, 0.4])
    assert pair["test_loss_lora_at_bd_params"] == pytest.approx(0.45)  # between 0.8 and 0.1
    assert pair["exact_match_lora_at_bd_params"] == pytest.approx(0.55)


def test_real_model_chat_task_holds_out_its_values(tmp_path):
    """--base smollm2's task: the rules are right, and no validation/test value is in training."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location(
        "chat_task", os.path.join(ROOT, "examples", "param_efficiency", "chat_task.py"))
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    assert [task.number_words(n) for n in (21, 40, 115, 300, 347, 999)] == [
        "twenty-one", "forty", "one hundred fifteen", "three hundred", "three hundred forty-seven",
        "nine hundred ninety-nine"]
    assert [task.ordinal(d) for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd"]
    paths = task.write_chat_task(str(tmp_path), num_train=200, num_eval=40, seed=0)
    answers = {}
    for split in ("train", "val", "test"):
        records = [json.loads(line)["messages"] for line in open(paths[split])]
        assert len(records) == (200 if split == "train" else 40)
        answers[split] = {m[-1]["content"] for m in records}
        dates = [a for a in answers[split] if re.fullmatch(r"\d{4}-\d\d-\d\d", a)]
        assert 0.3 < len(dates) / len(answers[split]) < 0.7  # both skills in every split
        for m in records:  # the question names the answer's value
            q, a = m[1]["content"], m[-1]["content"]
            if a in dates:
                year, month, day = map(int, a.split("-"))
                assert str(year) in q and task.MONTHS[month - 1] in q and str(day) in q
            else:
                assert task.number_words(int(re.search(r"\d+", q).group())) == a
    assert not answers["train"] & (answers["val"] | answers["test"])
    assert not answers["val"] & answers["test"]

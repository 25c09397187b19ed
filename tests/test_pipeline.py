"""`maect run`: stages chained through run directories, evaluation, comparison table, skipping."""

import json
import re
from types import SimpleNamespace

import pytest
import yaml

from maect.callbacks import StageProgress
from maect.config import ConfigError
from maect.pipeline import cpu_name, load_pipeline, run_pipeline, source_eval_items
from tests.conftest import TINY_OVERRIDES
from tests.test_maect import MAECT_TINY


def _write(tmp_path, **changes):
    spec = {
        "description": "tiny",
        "overrides": ["trainer.epochs=1", "trainer.recon_every=1"],
        "stages": [
            {
                "name": "mae",
                "command": "pretrain",
                "recipe": "mae/fmnist_vit_t",
                "overrides": TINY_OVERRIDES,
            },
            {
                "name": "ct",
                "command": "tune",
                "recipe": "maect/fmnist_vit_t",
                "init": "mae",
                "overrides": MAECT_TINY,
            },
        ],
        "evaluate": ["pixels", "mae", "ct"],
        "eval_overrides": [
            "data.name=synthetic",
            "protocols=[knn,cluster]",
            "plot=false",
            "device=cpu",
        ],
        "comparisons": [
            {"method": "ct", "baseline": "mae", "metrics": ["knn.top1"], "claim": "tuning helps"}
        ],
        "note": "tiny synthetic pipeline",
    }
    spec.update(changes)
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_pipeline_runs_chains_and_skips(tmp_path, capsys):
    recipe = _write(tmp_path)
    out = tmp_path / "out"
    summary = run_pipeline(recipe, str(out))
    for name in (
        "mae/encoder.pt",
        "ct/encoder.pt",
        "ct/head/head.pt",
        "mae/eval.json",
        "ct/eval.json",
        "pixels/eval.json",
        "results.json",
        "results.md",
    ):
        assert (out / name).is_file(), name
    ct_config = yaml.safe_load((out / "ct" / "config.yaml").read_text())
    assert ct_config["maect"]["init"] == str(out / "mae")
    assert set(summary["results"]) == {"pixels", "mae", "ct"}
    delta = summary["comparisons"][0]["deltas"]["knn.top1"]
    expected = summary["results"]["ct"]["knn"]["top1"] - summary["results"]["mae"]["knn"]["top1"]
    assert delta == pytest.approx(expected)
    table = (out / "results.md").read_text()
    assert "| mae |" in table and "| ct |" in table and "tiny synthetic pipeline" in table
    assert "k-NN: weighted k-NN on frozen features" in table  # which protocol made each column
    assert json.loads((out / "results.json").read_text())["pipeline"] == recipe

    printed = capsys.readouterr().out
    assert f"2 training stages, 3 evaluations on {cpu_name()} (" in printed
    for stage in ("mae", "ct/head", "ct/tune"):  # the time left in each training stage
        assert re.search(
            rf"\[{stage}\] epoch 1/1: \d+ s so far, about 0 s left in this stage", printed
        )
    assert "stage mae done in" in printed and "still to run: stage ct, evaluate pixels" in printed
    assert re.search(
        rf"maect run {re.escape(recipe)}: \d+ s in all on {re.escape(cpu_name())}", printed
    )

    mtime = (out / "mae" / "encoder.pt").stat().st_mtime
    again = run_pipeline(recipe, str(out))  # all exists: nothing retrained or re-evaluated
    assert (out / "mae" / "encoder.pt").stat().st_mtime == mtime
    assert "=== evaluate" not in capsys.readouterr().out
    # a skipped stage reports the training time recorded when it was trained, not the skip's
    for stage in ("mae", "ct"):
        timing = json.loads((out / stage / "train_time.json").read_text())
        recorded = timing["train_seconds"]
        assert timing["resumed"] is False and timing["device"]
        assert again["train_seconds"][stage] == pytest.approx(recorded)
        assert recorded == pytest.approx(summary["train_seconds"][stage])


def test_pipeline_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\].init must name an earlier stage"):
        load_pipeline(
            _write(
                tmp_path,
                stages=[
                    {"name": "a", "recipe": "mae/fmnist_vit_t"},
                    {"name": "b", "command": "tune", "recipe": "maect/fmnist_vit_t", "init": "zzz"},
                ],
            )
        )
    with pytest.raises(ConfigError, match="unknown key 'stages\\[0\\].recipee'"):
        load_pipeline(_write(tmp_path, stages=[{"name": "a", "recipee": "x"}]))
    with pytest.raises(ConfigError, match="evaluate: unknown source 'nope'"):
        load_pipeline(_write(tmp_path, evaluate=["nope"]))


def test_shipped_pipelines_resolve():
    for name in ("demo_fmnist", "reproduce_fmnist"):
        spec, stages, _ = load_pipeline(name)
        assert stages and spec.evaluate[0] == "pixels"


@pytest.mark.parametrize("on_gpu", [False, True])
def test_gpu_overrides_apply_only_on_a_gpu(tmp_path, monkeypatch, on_gpu):
    from maect import pipeline

    monkeypatch.setattr(pipeline, "on_gpu", lambda: on_gpu)
    recipe = _write(tmp_path, gpu_overrides=["data.subset=100"], gpu_note="on a GPU")
    path = tmp_path / "pipe.yaml"
    spec_yaml = yaml.safe_load(path.read_text())
    spec_yaml["stages"][0]["gpu_overrides"] = ["trainer.epochs=7"]
    path.write_text(yaml.safe_dump(spec_yaml))
    spec, stages, _ = load_pipeline(recipe)
    assert pipeline.pipeline_note(spec) == ("on a GPU" if on_gpu else "tiny synthetic pipeline")
    cfg = pipeline.stage_config(spec, stages[0], tmp_path, ["data.batch_size=4"])
    assert cfg.trainer.epochs == (7 if on_gpu else 1)
    assert cfg.data.subset == (100 if on_gpu else None)
    assert cfg.data.batch_size == 4  # command-line overrides come last


def test_stage_progress_estimates_from_the_measured_rate(tmp_path, capsys, monkeypatch):
    """Time left = measured seconds per step since the stage (re)started x steps still to do."""
    clock = iter([100.0, 130.0, 160.0])  # start, after 10 steps, after epoch 1 (20 steps)
    monkeypatch.setattr("maect.callbacks.time.perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(
        global_step=40,  # resumed at step 40 of 100
        estimated_stepping_batches=100,
        is_global_zero=True,
        sanity_checking=False,
        current_epoch=2,
        max_epochs=5,
        default_root_dir=str(tmp_path / "maect" / "tune"),
    )
    progress = StageProgress(root=tmp_path)
    progress.on_train_start(trainer, None)
    trainer.global_step = 50
    progress.on_train_batch_end(trainer, None, None, None, 9)
    trainer.global_step = 60
    progress.on_train_epoch_end(trainer, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[maect/tune] 10 steps: 30 s so far, about 2.5 min left in this stage (3.00 s per step)",
        "[maect/tune] epoch 3/5: 60 s so far, about 2.0 min left in this stage (3.00 s per step)",
    ]


def test_per_block_settings_reach_encoders_but_not_pixels(tmp_path):
    """A pipeline's `layers=all` applies to every encoder; raw pixels (no blocks) are evaluated
    without it instead of failing with 'the per-block analysis needs an encoder'."""
    from maect.evaluation.command import load_eval_config

    items = ["layers=all", "progress=false"]
    encoder = load_eval_config(source_eval_items(items, "mae", tmp_path / "mae"))
    pixels = load_eval_config(source_eval_items(items, "pixels", tmp_path / "pixels"))
    assert encoder.layers == "all" and encoder.out is None
    assert pixels.layers is None and pixels.out == str(tmp_path / "pixels")
    assert load_pipeline("refine_fmnist")[0].eval_overrides[-1] == "layers=all"


def test_a_claim_with_margins_needs_the_gain_not_only_the_direction():
    from maect.pipeline import Comparison, check, format_results

    results = {"refiner": {"knn": {"top1": 80.0}}, "mae": {"knn": {"top1": 78.5}}}
    aim = Comparison("refiner", "mae", ["knn.top1"], "+3 k-NN", margins={"knn.top1": 3})
    direction = Comparison("refiner", "mae", ["knn.top1"], "any gain")
    assert not check(aim, results)["holds"] and check(direction, results)["holds"]
    results["refiner"]["knn"]["top1"] = 81.5
    assert check(aim, results)["holds"]
    summary = {"train_seconds": {}, "results": results, "note": "",
               "comparisons": [check(aim, results)]}  # fmt: skip
    assert "knn.top1 +3.0 (aim ≥ +3) — shows here" in format_results(summary)


def test_margins_must_name_a_metric_of_the_claim(tmp_path):
    spec = {
        "stages": [{"name": "mae", "command": "pretrain", "recipe": "mae/fmnist_vit_t"}],
        "evaluate": ["pixels", "mae"],
        "comparisons": [{"method": "mae", "baseline": "pixels", "metrics": ["knn.top1"],
                         "margins": {"linear.top1": 1}}],
    }  # fmt: skip
    recipe = tmp_path / "p.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"margins: 'linear.top1' is not in its metrics"):
        load_pipeline(str(recipe))


def test_a_resumed_stage_has_its_training_minutes_marked():
    from maect.pipeline import RESUMED_NOTE, format_results

    summary = {"train_seconds": {"mae": 120.0, "maect": 60.0}, "resumed": ["maect"],
               "results": {"mae": {"knn": {"top1": 1.0}}, "maect": {"knn": {"top1": 2.0}}},
               "note": "", "comparisons": []}  # fmt: skip
    table = format_results(summary)
    assert "| 2.0 |" in table and "| 1.0* |" in table and RESUMED_NOTE in table

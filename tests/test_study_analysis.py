"""A real batch-size study on photos, repeated over seeds, fed to the analysis."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrfinder.analysis import analyze_study
from lrfinder.data import DECODE_CACHE
from lrfinder.settings import Settings
from lrfinder.spec import JobSpec
from lrfinder.study import RunResult, run_study


def curve_of(result: RunResult) -> dict:
    return {
        "batch_size": result.key.batch_size,
        "repeat": result.key.repeat,
        "status": "succeeded",
        "lr": result.lrs,
        "loss": result.losses,
        "smoothed_loss": result.smoothed_losses,
    }


@pytest.fixture(scope="module")
def study_analysis(data_root: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    spec = JobSpec.model_validate(
        {
            "model": {"name": "small_cnn"},
            "dataset": {"name": "photos", "image_size": 32},
            "batch_sizes": [32, 16, 8],
            "sweep": {"start_lr": 1e-5, "end_lr": 10.0, "num_iter": 40},
            "repeats": 3,
            "seed": 7,
        }
    )
    settings = Settings(data_root=data_root, weights_root=data_root, decode_workers=1)
    try:
        result = run_study(spec, settings=settings, device="cpu")
    finally:
        torch.set_num_threads(threads)
        DECODE_CACHE.clear()
    curves = [curve_of(run) for run in result.runs]
    return {
        "runs": result.runs,
        "analysis": analyze_study(curves, mode="exponential", model_has_batchnorm=True),
    }


def test_study_runs_every_seed_of_every_batch_size(study_analysis: dict) -> None:
    keys = {(run.key.batch_size, run.key.repeat) for run in study_analysis["runs"]}
    assert keys == {(size, repeat) for size in (32, 16, 8) for repeat in range(3)}


def test_study_analysis_reports_three_repeats(study_analysis: dict) -> None:
    for entry in study_analysis["analysis"]["batch_sizes"]:
        assert entry["repeats"] == 3


def test_study_analysis_alpha_has_interval(study_analysis: dict) -> None:
    valley = study_analysis["analysis"]["scaling"]["valley"]
    low, high = valley["alpha_interval"]
    assert low <= valley["alpha"] <= high


def test_study_analysis_gives_verdict_text(study_analysis: dict) -> None:
    verdict = study_analysis["analysis"]["scaling"]["valley"]["verdict"]
    assert isinstance(verdict["text"], str)
    assert verdict["text"]


def test_study_analysis_reports_finder_noise(study_analysis: dict) -> None:
    for entry in study_analysis["analysis"]["batch_sizes"]:
        assert entry["methods"]["valley"]["log10_spread"] is not None


def test_study_analysis_flags_batchnorm_small_batch(study_analysis: dict) -> None:
    assert "without_smallest" in study_analysis["analysis"]["scaling"]["valley"]

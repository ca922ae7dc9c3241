"""The batch-size scaling fits, the verdict and the gradient noise scale."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lrfinder.scaling import (
    estimate_noise_scale,
    fit_power_law,
    fit_saturating,
    verdict,
)

BATCH_SIZES = [8, 16, 32, 64, 128, 256]


def power_law_samples(
    alpha: float, repeats: int, noise: float, seed: int
) -> dict[int, dict[int, float]]:
    """lr*(B) = 0.01 * (B / 8) ** alpha times log-normal noise per (B, seed).

    Each seed also gets one offset shared by every batch size, as the same
    initial weights give correlated suggestions.
    """
    generator = np.random.default_rng(seed)
    offsets = generator.normal(0, noise, repeats)
    samples: dict[int, dict[int, float]] = {}
    for batch_size in BATCH_SIZES:
        samples[batch_size] = {}
        for repeat in range(repeats):
            error = offsets[repeat] + generator.normal(0, noise)
            lr = 0.01 * (batch_size / 8) ** alpha * math.exp(error)
            samples[batch_size][repeat] = lr
    return samples


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_power_law_interval_contains_alpha(alpha: float) -> None:
    fit = fit_power_law(power_law_samples(alpha, repeats=5, noise=0.15, seed=3))
    low, high = fit["alpha_interval"]
    assert low <= alpha <= high


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_power_law_bootstrap_contains_alpha(alpha: float) -> None:
    fit = fit_power_law(power_law_samples(alpha, repeats=5, noise=0.15, seed=4))
    low, high = fit["alpha_interval_bootstrap"]
    assert low <= alpha <= high


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_power_law_estimate_close(alpha: float) -> None:
    fit = fit_power_law(power_law_samples(alpha, repeats=5, noise=0.15, seed=5))
    assert fit["alpha"] == pytest.approx(alpha, abs=0.15)
    assert fit["multiplier_per_doubling"] == pytest.approx(2 ** fit["alpha"])


def test_power_law_coverage_over_seeds() -> None:
    """The t interval covers the true alpha in most of 40 simulated studies."""
    covered = 0
    for seed in range(40):
        fit = fit_power_law(power_law_samples(0.5, repeats=3, noise=0.2, seed=seed))
        low, high = fit["alpha_interval"]
        covered += low <= 0.5 <= high
    assert covered >= 34


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [(1.0, ["linear scaling"]), (0.5, ["square-root scaling"]), (0.0, ["no scaling"])],
)
def test_verdict_names_true_rule(alpha: float, expected: list[str]) -> None:
    fit = fit_power_law(power_law_samples(alpha, repeats=5, noise=0.1, seed=6))
    found = verdict(fit)
    assert found["consistent"] == expected
    assert found["decided"] is True
    assert len(found["excluded"]) == 2


def test_verdict_falling_lr_noted() -> None:
    fit = fit_power_law(power_law_samples(-0.5, repeats=5, noise=0.1, seed=17))
    found = verdict(fit)
    assert found["consistent"] == []
    assert "falls as the batch grows" in found["text"]


def test_verdict_single_repeat_undecided() -> None:
    fit = fit_power_law(power_law_samples(0.5, repeats=1, noise=0.3, seed=7))
    found = verdict(fit)
    assert found["decided"] is False
    assert found["repeats_needed"] >= 3
    assert "single repeat" in found["text"]


def test_verdict_repeats_needed_grows_with_noise() -> None:
    quiet = verdict(fit_power_law(power_law_samples(0.5, 1, noise=0.2, seed=8)))
    loud = verdict(fit_power_law(power_law_samples(0.5, 1, noise=0.8, seed=8)))
    assert loud["repeats_needed"] > quiet["repeats_needed"]


def test_power_law_single_repeat_equal_weights() -> None:
    fit = fit_power_law(power_law_samples(1.0, repeats=1, noise=0.1, seed=9))
    assert fit["weights"] == "equal"
    assert fit["alpha_interval_bootstrap"] is None


def test_power_law_one_batch_size_no_fit() -> None:
    fit = fit_power_law({64: {0: 0.01, 1: 0.02}})
    assert fit["alpha"] is None
    assert fit["reason"] == "too_few_batch_sizes"


def test_power_law_two_batch_sizes_no_t_interval() -> None:
    fit = fit_power_law({16: {0: 0.01}, 64: {0: 0.04}})
    assert fit["alpha"] == pytest.approx(1.0)
    assert fit["alpha_interval"] is None
    assert verdict(fit)["decided"] is False


def test_power_law_missing_suggestions_skipped() -> None:
    samples = power_law_samples(1.0, repeats=3, noise=0.1, seed=10)
    samples[8][1] = None
    samples[512] = {0: None, 1: None, 2: None}
    fit = fit_power_law(samples)
    assert [point["batch_size"] for point in fit["points"]] == BATCH_SIZES
    assert fit["points"][0]["count"] == 2


def test_power_law_result_is_strict_json() -> None:
    fit = fit_power_law(power_law_samples(1.0, repeats=3, noise=0.1, seed=11))
    json.dumps(fit, allow_nan=False, default=float)


def saturating_samples(
    b_noise: float, repeats: int, noise: float, seed: int
) -> dict[int, dict[int, float]]:
    generator = np.random.default_rng(seed)
    sizes = [2**k for k in range(2, 13)]
    return {
        b: {
            r: 0.5 / (1 + b_noise / b) * math.exp(generator.normal(0, noise))
            for r in range(repeats)
        }
        for b in sizes
    }


def test_saturating_detects_saturation() -> None:
    fit = fit_saturating(saturating_samples(64.0, repeats=4, noise=0.05, seed=12))
    assert fit["saturated"] is True


def test_saturating_interval_contains_b_noise() -> None:
    fit = fit_saturating(saturating_samples(64.0, repeats=4, noise=0.05, seed=13))
    low, high = fit["b_noise_interval"]
    assert low <= 64.0 <= high
    assert fit["lr_max"] == pytest.approx(0.5, rel=0.15)


def test_saturating_pure_power_law_lower_bound() -> None:
    fit = fit_saturating(power_law_samples(1.0, repeats=4, noise=0.05, seed=14))
    assert fit["saturated"] is False
    assert fit["b_noise"] is None
    assert fit["b_noise_lower_bound"] > 0


def test_saturating_square_root_law_not_saturated() -> None:
    fit = fit_saturating(power_law_samples(0.5, repeats=4, noise=0.05, seed=16))
    assert fit["better_than_power_law"] is False
    assert fit["saturated"] is False


def test_saturating_falling_lr_not_fitted() -> None:
    fit = fit_saturating(power_law_samples(-0.5, repeats=2, noise=0.05, seed=15))
    assert fit["reason"] == "lr_not_increasing"


# Gradient noise scale on linear regression, where everything is closed form.
#
# Per-sample loss 0.5 * (x.w - y) ** 2 with x ~ N(0, I_d), y = x.w* + e,
# e ~ N(0, s2). With delta = w - w*, the per-sample gradient is
# x (x.delta - e), its mean is G = delta, and its covariance is
# Sigma = (|delta|^2 + s2) I + delta delta^T (Gaussian fourth moments), so
# tr(Sigma) = d (|delta|^2 + s2) + |delta|^2 and B_simple = tr(Sigma) / |G|^2.

DIMENSION = 10
NOISE_VARIANCE = 1.0


def linear_regression_norms(
    batch_size: int, batches: int, generator: np.random.Generator
) -> list[float]:
    delta = np.ones(DIMENSION) / math.sqrt(DIMENSION)  # |delta|^2 = 1
    norms = []
    for _ in range(batches):
        x = generator.normal(size=(batch_size, DIMENSION))
        e = generator.normal(0, math.sqrt(NOISE_VARIANCE), batch_size)
        gradients = x * (x @ delta - e)[:, None]  # (batch, dimension)
        norms.append(float((gradients.mean(axis=0) ** 2).sum()))
    return norms


def closed_form_b_simple() -> float:
    norm_squared = 1.0
    trace = DIMENSION * (norm_squared + NOISE_VARIANCE) + norm_squared
    return trace / norm_squared


def simulated_measurements(seed: int) -> dict[int, list[float]]:
    generator = np.random.default_rng(seed)
    measurements = {
        batch_size: linear_regression_norms(batch_size, 200, generator)
        for batch_size in (2, 4, 8, 16, 32, 64)
    }
    measurements[8192] = linear_regression_norms(8192, 4, generator)
    return measurements


def test_noise_scale_recovers_b_simple() -> None:
    found = estimate_noise_scale(simulated_measurements(seed=16))
    assert found["b_simple"] == pytest.approx(closed_form_b_simple(), rel=0.15)


def test_noise_scale_interval_contains_b_simple() -> None:
    found = estimate_noise_scale(simulated_measurements(seed=17))
    low, high = found["b_simple_interval"]
    assert low <= closed_form_b_simple() <= high


def test_noise_scale_recovers_parts() -> None:
    found = estimate_noise_scale(simulated_measurements(seed=18))
    assert found["gradient_norm_squared"] == pytest.approx(1.0, rel=0.1)
    expected_trace = DIMENSION * (1.0 + NOISE_VARIANCE) + 1.0
    assert found["trace_covariance"] == pytest.approx(expected_trace, rel=0.15)


def test_noise_scale_string_keys_accepted() -> None:
    measurements = {str(b): v for b, v in simulated_measurements(seed=19).items()}
    assert estimate_noise_scale(measurements)["batch_sizes"][0] == 2


def test_noise_scale_pure_noise_no_b_simple() -> None:
    # Zero true gradient: E|G_B|^2 = tr(Sigma) / B exactly.
    measurements = {b: [10.0 / b] * 3 for b in (2, 8, 32)}
    measurements[4096] = [0.0]
    found = estimate_noise_scale(measurements)
    assert found["b_simple"] is None
    assert found["reason"] == "gradient_norm_not_positive"


def test_noise_scale_one_batch_size_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        estimate_noise_scale({64: [1.0, 2.0]})


def test_noise_scale_negative_norm_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        estimate_noise_scale({8: [1.0, -2.0], 64: [1.0]})


def test_noise_scale_empty_list_rejected() -> None:
    with pytest.raises(ValueError, match=r"measurements\[64\]"):
        estimate_noise_scale({8: [1.0], 64: []})

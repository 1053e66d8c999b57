"""Physics of the vendor profiles: rate vs loss, budget, classical noise, QBER, calibration."""
from __future__ import annotations

import random
import statistics

import pytest

from sdqkd.qkdprofile import (
    BUILTIN_PROFILES, QkdProfile, calibrate, can_make_key, distilled_bits, mean_qber,
    no_key_reason, parse_wavelength_range, sample_qber, secret_key_rate, span_loss_limit,
)

TOSHIBA = BUILTIN_PROFILES["toshiba-bb84-o"]
HUAWEI = BUILTIN_PROFILES["huawei-cv-c"]


def test_rate_falls_monotonically_with_loss() -> None:
    for prof in BUILTIN_PROFILES.values():
        losses = [x * 0.5 for x in range(int(prof.max_absorption * 2) + 1)]
        rates = [secret_key_rate(prof, loss) for loss in losses]
        assert all(a > b for a, b in zip(rates, rates[1:])), prof.name
        assert secret_key_rate(prof, prof.reference_loss) == pytest.approx(prof.reference_skr * 1000)


def test_no_key_beyond_max_absorption() -> None:
    assert secret_key_rate(HUAWEI, 23.0) > 0
    assert secret_key_rate(HUAWEI, 23.01) == 0
    assert no_key_reason(HUAWEI, 23.5, 2.0) == "loss 23.50 dB over budget 23.00 dB"
    assert not can_make_key(HUAWEI, 23.5, 2.0)
    assert distilled_bits(HUAWEI, 23.5, 0, 2.0, 10.0, random.Random(1)) == 0


def test_classical_channels_in_band_lower_rate_and_raise_qber() -> None:
    clean = secret_key_rate(HUAWEI, 11.8)
    noisy = secret_key_rate(HUAWEI, 11.8, same_band_classical=4)
    # each classical channel is an equivalent loss (on the CV curve as on the DV power law)
    assert noisy == pytest.approx(secret_key_rate(HUAWEI, 11.8 + HUAWEI.classical_penalty * 4)) and noisy < clean
    cer = BUILTIN_PROFILES["idq-cerberis3-c"]
    assert secret_key_rate(cer, 7.47, 4) == pytest.approx(secret_key_rate(cer, 7.47) * 10 ** (-cer.classical_penalty * 4 / 10))
    assert mean_qber(HUAWEI, 11.8, 4) > mean_qber(HUAWEI, 11.8, 0)
    assert secret_key_rate(HUAWEI, 11.8, crosstalk=True) == 0


def test_calibration_reproduces_measured_madqci_rates() -> None:
    # Distrito-Concepcion, Toshiba O-band: 14.3 dB, 242.33 kb/s (the C-band classicals are another band)
    cal = calibrate(TOSHIBA, 14.3, 242.33)
    assert secret_key_rate(cal, 14.3) == pytest.approx(242330)
    assert secret_key_rate(TOSHIBA, 14.3) != pytest.approx(242330, rel=0.05)
    # Quijote-Quiron, Huawei CV in the C-band with 4 classical channels: 11.8 dB, 6.2 kb/s
    cal = calibrate(HUAWEI, 11.8, 6.2, same_band_classical=4)
    assert secret_key_rate(cal, 11.8, same_band_classical=4) == pytest.approx(6200)
    assert secret_key_rate(cal, 15.0, 4) < 6200
    assert mean_qber(cal, 11.8) == pytest.approx(mean_qber(HUAWEI, 11.8))
    assert TOSHIBA.reference_loss == 2.0  # the original is untouched
    with pytest.raises(ValueError):
        calibrate(HUAWEI, 30.0, 1.0)


def test_qber_noise_has_the_configured_spread() -> None:
    rng = random.Random(7)
    samples = [sample_qber(TOSHIBA, TOSHIBA.reference_loss, 0, rng) for _ in range(4000)]
    assert statistics.fmean(samples) == pytest.approx(TOSHIBA.qber, abs=0.03)
    assert statistics.stdev(samples) == pytest.approx(TOSHIBA.qber_noise, rel=0.08)
    assert min(samples) >= 0
    quiet = QkdProfile.from_dict({**TOSHIBA.to_dict(), "qber-noise": "0"})
    assert {sample_qber(quiet, 5.0, 0, rng) for _ in range(10)} == {mean_qber(quiet, 5.0)}


def test_qber_grows_with_loss_and_threshold_stops_key() -> None:
    assert mean_qber(TOSHIBA, 20.0) > mean_qber(TOSHIBA, 10.0) > mean_qber(TOSHIBA, 2.0)
    # half the headroom is used at the budget; classical noise beyond it crosses the threshold
    assert mean_qber(TOSHIBA, TOSHIBA.max_absorption) == pytest.approx(7.0)
    assert mean_qber(TOSHIBA, TOSHIBA.max_absorption, 20) > TOSHIBA.qber_threshold
    rng = random.Random(3)
    assert distilled_bits(TOSHIBA, 5.0, 0, 11.5, 1.0, rng) == 0
    assert no_key_reason(TOSHIBA, 5.0, 11.5) == "QBER over threshold 11.00 %"
    assert distilled_bits(TOSHIBA, 5.0, 0, 3.0, 1.0, rng) > 0


def test_distilled_bits_average_to_the_rate() -> None:
    rng = random.Random(11)
    for loss, seconds in ((11.1, 0.05), (20.0, 0.1)):  # ~370 and ~50 bits/block, ~1 bit at 20 dB
        rate = secret_key_rate(HUAWEI, loss)
        total = 0
        for _ in range(2000):
            q = sample_qber(HUAWEI, loss, 0, rng)
            total += distilled_bits(HUAWEI, loss, 0, q, seconds, rng)
        assert total / (2000 * seconds) == pytest.approx(rate, rel=0.1)


def test_profile_from_yang_dict_collects_problems() -> None:
    entry = BUILTIN_PROFILES["idq-cerberis3-c"].to_dict()
    assert entry["technology"] == "etsi-qkd-node-types:DV-QKD-COW"
    assert QkdProfile.from_dict(entry) == BUILTIN_PROFILES["idq-cerberis3-c"]
    prof = QkdProfile.from_dict({"name": "x", "technology": "etsi-qkdn-types:CV-QKD", "band": "C-band",
                                 "max-absorption": "10", "reference-skr": "1.5", "reference-loss": "3"})
    assert prof.technology == "etsi-qkd-node-types:CV-QKD" and prof.role_support == "TRANSCEIVER"
    with pytest.raises(ValueError) as err:
        QkdProfile.from_dict({"name": "bad", "band": "L-band", "max-absorptoin": "1"})
    text = str(err.value)
    assert "unknown leaf 'max-absorptoin'" in text and "missing leaf 'technology'" in text


def test_channels_and_roles() -> None:
    assert parse_wavelength_range("1,12-14,40") == {1, 12, 13, 14, 40}
    cer = BUILTIN_PROFILES["idq-cerberis3-c"]
    assert cer.supports_channel(34) and not cer.supports_channel(33)
    assert BUILTIN_PROFILES["idq-cerberis3-o"].supports_channel(33)  # O-band ignores channels
    tx_only = QkdProfile.from_dict({**cer.to_dict(), "role-support": "etsi-qkd-node-types:TRANSMITTER"})
    assert tx_only.supports_role("TRANSMITTER") and not tx_only.supports_role("RECEIVER")
    assert set(BUILTIN_PROFILES) >= {"idq-cerberis3-o", "idq-cerberis3-c", "toshiba-bb84-o",
                                     "huawei-cv-c", "heqa-dv-o", "ait-cv-qpsk"}
    assert HUAWEI.max_absorption == 23.0


def test_dv_profiles_keep_the_power_law() -> None:
    """Profiles without the CV leaves (loss-limit, max-skr) follow the old model exactly."""
    for prof in BUILTIN_PROFILES.values():
        if prof.loss_limit is None and prof.max_skr is None:
            assert span_loss_limit(prof, 3) is None
            for loss in (1.0, prof.reference_loss + 3.0):
                want = prof.reference_skr * 1000 * 10 ** (-prof.loss_exponent * (loss - prof.reference_loss) / 10)
                assert secret_key_rate(prof, loss) == pytest.approx(want)
                assert secret_key_rate(prof, loss, spans=4) == secret_key_rate(prof, loss)
    assert HUAWEI.loss_limit is not None and HUAWEI.max_skr is not None


def test_cv_form_limit_spans_cap_and_calibration() -> None:
    limit = HUAWEI.loss_limit
    assert span_loss_limit(HUAWEI, 1) == limit and span_loss_limit(HUAWEI, 2) == limit - HUAWEI.span_penalty
    # more spans, less key at the same loss (each switched span adds excess noise)
    assert secret_key_rate(HUAWEI, 15.0, spans=1) > secret_key_rate(HUAWEI, 15.0, spans=2) > \
        secret_key_rate(HUAWEI, 15.0, spans=3) > 0
    assert secret_key_rate(HUAWEI, 0.0) < HUAWEI.max_skr * 1000
    # calibration keeps the shape and lands on the measured point, also over a classical penalty
    cal = calibrate(HUAWEI, 10.0, 9.0, same_band_classical=2)
    assert secret_key_rate(cal, 10.0, 2) == pytest.approx(9000)
    assert (cal.loss_limit, cal.span_penalty, cal.max_skr, cal.loss_exponent) == \
        (HUAWEI.loss_limit, HUAWEI.span_penalty, HUAWEI.max_skr, HUAWEI.loss_exponent)
    # a measured rate over the throughput cap lifts it (the device did better)
    fast = calibrate(HUAWEI, 3.0, 15.0)
    assert fast.max_skr == 30.0 and secret_key_rate(fast, 3.0) == pytest.approx(15000)
    # the YANG leaves round-trip and are checked
    assert QkdProfile.from_dict(HUAWEI.to_dict()) == HUAWEI
    assert {"loss-limit", "span-penalty", "max-skr"} <= set(HUAWEI.to_dict())
    with pytest.raises(ValueError) as err:
        QkdProfile.from_dict({**HUAWEI.to_dict(), "loss-limit": "5.0", "max-skr": "1.0"})
    assert "loss-limit must be above reference-loss" in str(err.value)
    assert "max-skr must be above reference-skr" in str(err.value)

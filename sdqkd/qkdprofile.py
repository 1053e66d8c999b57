"""What a vendor's QKD module does, as data plus pure physics.

A `QkdProfile` is one sdqkd-lab `profile` entry. The functions below turn a
channel (loss, co-propagating classical channels) into a secret key rate, a QBER
sample and a go/no-go, so the emulator behaves like the device without any I/O:
every random draw takes an explicit `rng`, which makes the physics testable.

Model (all losses in dB, the profile's units otherwise):
- effective loss = loss + classical-penalty * (classical channels in the same band);
- SKR = reference-skr * 1000 * 10^(-loss-exponent * (eff - reference-loss) / 10)
  bit/s, and 0 when the channel loss is over max-absorption (the loss budget) or a
  classical channel sits on / next to the quantum DWDM channel;
- profiles with a loss-limit (the CV ones) take the CV form instead, with T = 10^(-eff/10)
  and a path of n fibre spans (n = 1 for a direct link, one more per switched hop):
      x   = A * T^loss-exponent * (1 - T_lim(n) / T),   T_lim(n) = 10^(-limit(n) / 10),
      limit(n) = loss-limit - span-penalty * (n - 1),
      SKR = x / (1 + x / max-skr)         (bit/s; max-skr absent: SKR = x),
  and A such that SKR(reference-loss, one span) = reference-skr. The last factor of x
  is the asymptotic CV rate's fall to zero where the channel's excess noise, seen
  through reverse reconciliation of efficiency beta < 1, uses up the Holevo margin:
  beta*I_AB - chi_BE is linear in T - T_lim near the limit. Every switched span (a
  switch and two fixed-mux passes) adds excess noise, so the limit falls by
  span-penalty per span. max-skr is the post-processing (error-correction) throughput
  that flattens the rate of short links. loss-exponent > 1 is the fall of the key
  fraction with SNR at fixed modulation variance. Fitted to the MadQCI CV figures
  (npj Table 1 and the single links, shared/reference/madqci.md) in
  tests/lab/test_cv_rates.py;
- mean QBER = qber + k * (10^((eff - reference-loss)/10) - 1): the error floor
  (dark counts, Raman photons) is fixed while the signal falls with transmittance,
  so errors grow as 1/transmittance. k is chosen per profile so that at
  max-absorption, with no classical channel, the mean QBER has used
  QBER_HEADROOM_AT_BUDGET (half) of the way from qber to qber-threshold; classical
  noise beyond the budget pushes it over the threshold, as on real fibres.
- a QBER sample adds gaussian noise of sd qber-noise, clipped to 0..50 %;
- a tick's distilled bits are Poisson around SKR * seconds * f, with
  f = (threshold - sample) / (threshold - mean): a noisy block yields less key,
  a clean one more, and the mean rate stays the SKR above.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IDENTITY_MODULE = "etsi-qkd-node-types"
QBER_HEADROOM_AT_BUDGET = 0.5
ROLES = ("TRANSMITTER", "RECEIVER", "TRANSCEIVER")
BANDS = ("O-band", "C-band")

_FIELDS = {  # YANG leaf -> (attribute, parser)
    "name": ("name", str),
    "vendor": ("vendor", str),
    "model": ("model", str),
    "technology": ("technology", str),
    "protocol": ("protocol", str),
    "band": ("band", str),
    "wavelength-range": ("wavelength_range", str),
    "role-support": ("role_support", str),
    "max-absorption": ("max_absorption", float),
    "symbol-rate": ("symbol_rate", int),
    "reference-skr": ("reference_skr", float),
    "reference-loss": ("reference_loss", float),
    "loss-exponent": ("loss_exponent", float),
    "qber": ("qber", float),
    "qber-noise": ("qber_noise", float),
    "qber-threshold": ("qber_threshold", float),
    "classical-penalty": ("classical_penalty", float),
    "loss-limit": ("loss_limit", float),
    "span-penalty": ("span_penalty", float),
    "max-skr": ("max_skr", float),
    "mtbf": ("mtbf", int),
}
_MANDATORY = ("name", "technology", "band", "max-absorption", "reference-skr", "reference-loss")


def identity_name(value: str) -> str:
    """Bare identity of an identityref however it was written ('etsi-qkdn-types:PHYS' -> 'PHYS')."""
    return str(value).rsplit(":", 1)[-1]


def identity(value: str) -> str:
    """An etsi-qkd-node-types identity as RFC 7951 writes it ('PHYS' -> 'etsi-qkd-node-types:PHYS')."""
    return f"{IDENTITY_MODULE}:{identity_name(value)}"


def parse_wavelength_range(text: str) -> frozenset[int]:
    """DWDM channels of an ETSI wavelength-range-type ('1,12-20,40')."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"wavelength range '{part}' is descending")
        out.update(range(first, last + 1))
    return frozenset(out)


@dataclass(frozen=True)
class QkdProfile:
    """One vendor profile; units as in the sdqkd-lab YANG module (kbit/s, dB, percent, s)."""

    name: str
    technology: str
    band: str
    max_absorption: float
    reference_skr: float
    reference_loss: float
    vendor: str = ""
    model: str = ""
    protocol: str | None = None
    wavelength_range: str | None = None
    role_support: str = "TRANSCEIVER"
    symbol_rate: int | None = None
    loss_exponent: float = 1.0
    qber: float = 3.0
    qber_noise: float = 0.3
    qber_threshold: float = 11.0
    classical_penalty: float = 0.5
    loss_limit: float | None = None
    span_penalty: float = 0.0
    max_skr: float | None = None
    mtbf: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.band not in BANDS:
            problems.append(f"band '{self.band}' is not one of {', '.join(BANDS)}")
        if identity_name(self.role_support) not in ROLES:
            problems.append(f"role-support '{self.role_support}' is not one of {', '.join(ROLES)}")
        if self.reference_skr < 0 or self.max_absorption < 0 or self.reference_loss < 0:
            problems.append("reference-skr, reference-loss and max-absorption must be >= 0")
        if not 0.1 <= self.loss_exponent <= 10:
            problems.append("loss-exponent must be in 0.1..10")
        if self.loss_limit is not None and self.loss_limit <= self.reference_loss:
            problems.append("loss-limit must be above reference-loss")
        if self.span_penalty < 0:
            problems.append("span-penalty must be >= 0")
        if self.max_skr is not None and not self.max_skr > self.reference_skr:
            problems.append("max-skr must be above reference-skr")
        if self.wavelength_range is not None:
            try:
                parse_wavelength_range(self.wavelength_range)
            except ValueError as exc:
                problems.append(f"wavelength-range: {exc}")
        if problems:
            raise ValueError(f"profile '{self.name}': " + "; ".join(problems))
        # canonical forms: bare role, module-qualified technology identity
        object.__setattr__(self, "role_support", identity_name(self.role_support))
        object.__setattr__(self, "technology", f"{IDENTITY_MODULE}:{identity_name(self.technology)}")

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> "QkdProfile":
        """Build from an RFC 7951 `profile` entry (decimal64/uint64 may come as strings).

        Unknown and missing leaves are reported together, so a bad lab file is
        fixed in one go."""
        problems = [f"unknown leaf '{k}'" for k in entry if k not in _FIELDS]
        problems += [f"missing leaf '{k}'" for k in _MANDATORY if k not in entry]
        kwargs: dict[str, Any] = {}
        for key, value in entry.items():
            if key not in _FIELDS or value is None:
                continue
            attr, parse = _FIELDS[key]
            try:
                kwargs[attr] = parse(value)
            except (TypeError, ValueError):
                problems.append(f"leaf '{key}': bad value {value!r}")
        if problems:
            raise ValueError(f"profile '{entry.get('name', '?')}': " + "; ".join(problems))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """RFC 7951 form (decimal64 and uint64 as strings, absent leaves left out)."""
        out: dict[str, Any] = {}
        for leaf, (attr, parse) in _FIELDS.items():
            value = getattr(self, attr)
            if value is None or value == "":
                continue
            if leaf == "symbol-rate":
                value = str(value)
            elif parse is float:
                value = repr(float(value))  # the shortest text that reads back as the same float
            out[leaf] = value
        return out

    @property
    def channels(self) -> frozenset[int]:
        """DWDM channels the module tunes to; empty when it is not tunable/not C-band."""
        return parse_wavelength_range(self.wavelength_range) if self.wavelength_range else frozenset()

    def supports_channel(self, channel: int) -> bool:
        """Fixed-wavelength and O-band modules ignore the channel (ETSI 015 says they may)."""
        return self.band != "C-band" or not self.channels or channel in self.channels

    def supports_role(self, role: str) -> bool:
        role = identity_name(role)
        return role == self.role_support or (self.role_support == "TRANSCEIVER" and role in ROLES)


# --- physics ------------------------------------------------------------------


def effective_loss(profile: QkdProfile, loss_db: float, same_band_classical: int = 0) -> float:
    """Channel loss plus the noise of classical channels in the quantum channel's band, as dB."""
    return loss_db + profile.classical_penalty * max(0, same_band_classical)


def span_loss_limit(profile: QkdProfile, spans: int = 1) -> float | None:
    """Loss (dB) at which the CV rate reaches zero over a path of `spans` fibre spans;
    None for profiles without a loss limit (the DV ones)."""
    if profile.loss_limit is None:
        return None
    return profile.loss_limit - profile.span_penalty * (max(1, spans) - 1)


def _shape(profile: QkdProfile, eff: float, spans: int) -> float:
    """T^loss-exponent * (1 - T_lim/T), relative to the reference loss; <= 0 at/over the limit."""
    limit = span_loss_limit(profile, spans)
    fall = 1.0 if limit is None else 1.0 - 10 ** ((eff - limit) / 10)
    return 10 ** (-profile.loss_exponent * (eff - profile.reference_loss) / 10) * fall


def _cap(profile: QkdProfile, raw_bps: float) -> float:
    cap = profile.max_skr
    return raw_bps if cap is None else raw_bps / (1.0 + raw_bps / (cap * 1000.0))


def _uncap(profile: QkdProfile, bps: float) -> float:
    cap = profile.max_skr
    return bps if cap is None else bps / (1.0 - bps / (cap * 1000.0))


def secret_key_rate(profile: QkdProfile, loss_db: float, same_band_classical: int = 0,
                    crosstalk: bool = False, spans: int = 1) -> float:
    """Mean secret key rate in bit/s; 0 over the loss budget, at/over the CV loss limit of a
    `spans`-span path, or with in-/adjacent-channel classical light."""
    if crosstalk or loss_db > profile.max_absorption:
        return 0.0
    eff = effective_loss(profile, loss_db, same_band_classical)
    if profile.loss_limit is None and profile.max_skr is None:  # the DV power law
        return profile.reference_skr * 1000.0 * 10 ** (-profile.loss_exponent * (eff - profile.reference_loss) / 10)
    shape = _shape(profile, eff, spans)
    if shape <= 0:
        return 0.0
    scale = _uncap(profile, profile.reference_skr * 1000.0) / _shape(profile, profile.reference_loss, 1)
    return _cap(profile, scale * shape)


def qber_slope(profile: QkdProfile) -> float:
    """k of the QBER model (percent per unit of relative signal drop); see the module docstring."""
    span = 10 ** ((profile.max_absorption - profile.reference_loss) / 10) - 1
    headroom = max(profile.qber_threshold - profile.qber, 0.0)
    return QBER_HEADROOM_AT_BUDGET * headroom / (span if span > 0 else 1.0)


def mean_qber(profile: QkdProfile, loss_db: float, same_band_classical: int = 0) -> float:
    """Expected QBER in percent: errors rise as the signal falls."""
    eff = effective_loss(profile, loss_db, same_band_classical)
    growth = 10 ** ((eff - profile.reference_loss) / 10) - 1
    return min(50.0, max(0.0, profile.qber + qber_slope(profile) * growth))


def sample_qber(profile: QkdProfile, loss_db: float, same_band_classical: int, rng: random.Random) -> float:
    """One QBER measurement in percent (gaussian around the mean, clipped to 0..50)."""
    value = rng.gauss(mean_qber(profile, loss_db, same_band_classical), profile.qber_noise)
    return min(50.0, max(0.0, value))


def no_key_reason(profile: QkdProfile, loss_db: float, qber_pct: float, crosstalk: bool = False,
                  budget_db: float | None = None, same_band_classical: int = 0,
                  spans: int = 1) -> str | None:
    """Why this channel yields no key, or None when it does. `budget_db` overrides
    max-absorption (e.g. the receiver's, when it is smaller)."""
    budget = profile.max_absorption if budget_db is None else budget_db
    if crosstalk:
        return "classical channel on or next to the quantum channel"
    if loss_db > budget:
        return f"loss {loss_db:.2f} dB over budget {budget:.2f} dB"
    limit = span_loss_limit(profile, spans)
    eff = effective_loss(profile, loss_db, same_band_classical)
    if limit is not None and eff >= limit:
        return f"loss {eff:.2f} dB at or over the loss limit {limit:.2f} dB of a {max(1, spans)}-span path"
    if qber_pct > profile.qber_threshold:  # no sample value: the reason must not change every block
        return f"QBER over threshold {profile.qber_threshold:.2f} %"
    return None


def can_make_key(profile: QkdProfile, loss_db: float, qber_pct: float, crosstalk: bool = False) -> bool:
    return no_key_reason(profile, loss_db, qber_pct, crosstalk) is None


def poisson(lam: float, rng: random.Random) -> int:
    """Poisson draw (Knuth below 30, normal approximation above): photon-counting statistics."""
    if lam <= 0:
        return 0
    if lam < 30:
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return k
            k += 1
    return max(0, round(rng.gauss(lam, math.sqrt(lam))))


def distilled_bits(profile: QkdProfile, loss_db: float, same_band_classical: int, qber_pct: float,
                   seconds: float, rng: random.Random, crosstalk: bool = False,
                   budget_db: float | None = None, spans: int = 1) -> int:
    """Secret bits a block distils over `seconds` given its measured QBER (see module docstring)."""
    if no_key_reason(profile, loss_db, qber_pct, crosstalk, budget_db, same_band_classical, spans) is not None:
        return 0
    mean_q = mean_qber(profile, loss_db, same_band_classical)
    headroom = profile.qber_threshold - mean_q
    if headroom <= 0:
        return 0
    factor = min(2.0, max(0.0, (profile.qber_threshold - qber_pct) / headroom))
    rate = secret_key_rate(profile, loss_db, same_band_classical, spans=spans)
    return poisson(rate * seconds * factor, rng)


def calibrate(profile: QkdProfile, loss_db: float, measured_kbps: float,
              same_band_classical: int = 0) -> QkdProfile:
    """A copy whose reference point is a measured link (sdqkd-lab link expected-skr).

    secret_key_rate(copy, loss_db, same_band_classical) == measured_kbps * 1000 (one span);
    the curve's shape (exponent, loss limit, throughput cap) and the QBER curve are kept
    (qber becomes the old mean at the new reference loss). A measured rate at or over the
    profile's max-skr lifts the cap to twice the measured rate: the device did better."""
    if measured_kbps <= 0:
        raise ValueError("a calibration needs a positive measured key rate")
    if loss_db > profile.max_absorption:
        raise ValueError(f"profile '{profile.name}': measured loss {loss_db} dB is over its "
                         f"max-absorption {profile.max_absorption} dB")
    eff = effective_loss(profile, loss_db, same_band_classical)
    qber = mean_qber(profile, loss_db, 0)
    if profile.loss_limit is None and profile.max_skr is None:
        penalty = eff - loss_db
        return dataclasses.replace(profile, reference_loss=loss_db, qber=qber,
                                   reference_skr=measured_kbps * 10 ** (profile.loss_exponent * penalty / 10))
    limit = span_loss_limit(profile, 1)
    if limit is not None and eff >= limit:
        raise ValueError(f"profile '{profile.name}': measured effective loss {eff:.2f} dB is at or over "
                         f"its loss-limit {limit:.2f} dB")
    cap = profile.max_skr
    if cap is not None and measured_kbps >= cap:
        cap = 2 * measured_kbps
    moved = dataclasses.replace(profile, reference_loss=loss_db, max_skr=cap, qber=qber)
    moved_shape = _shape(moved, loss_db, 1)
    raw = _uncap(moved, measured_kbps * 1000.0) * moved_shape / _shape(moved, eff, 1)
    return dataclasses.replace(moved, reference_skr=_cap(moved, raw) / 1000.0)


# --- MadQCI vendor profiles -----------------------------------------------------
# Reference points are links measured in MadQCI (shared/reference/madqci.md) unless
# marked "assumed": those figures are not in the papers and are set to the order of
# magnitude of the device class; calibrate() them against a measured link.

_BUILTIN: tuple[dict[str, Any], ...] = (
    {  # Quijote-Quevedo, 4.00 dB, 2.04 kb/s; max-absorption assumed
        "name": "idq-cerberis3-o", "vendor": "ID Quantique", "model": "Cerberis3",
        "technology": "etsi-qkd-node-types:DV-QKD-COW", "protocol": "COW", "band": "O-band",
        "role-support": "etsi-qkd-node-types:TRANSCEIVER", "max-absorption": "18.0",
        "symbol-rate": "625000000", "reference-skr": "2.04", "reference-loss": "4.0",
        "loss-exponent": "1.0", "qber": "3.2", "qber-noise": "0.4", "qber-threshold": "8.0",
        "classical-penalty": "0.5",
    },
    {  # Quintin-Quijote on C-34, 7.47 dB, 1.95 kb/s (with its 8 classical channels lit). QBER 3.0 and
       # 0.5 dB per same-band classical channel put that link at 3.4 % mean, in the paper's DV range
       # 2.2-4.2 %; the former 3.5 and 1.0 dB gave 4.7 % (samples 4.4-5.9 %), which the paper contradicts
        "name": "idq-cerberis3-c", "vendor": "ID Quantique", "model": "Cerberis3",
        "technology": "etsi-qkd-node-types:DV-QKD-COW", "protocol": "COW", "band": "C-band",
        "wavelength-range": "32,34", "role-support": "etsi-qkd-node-types:TRANSCEIVER",
        "max-absorption": "18.0", "symbol-rate": "625000000", "reference-skr": "1.95",
        "reference-loss": "7.47", "loss-exponent": "1.0", "qber": "3.0", "qber-noise": "0.4",
        "qber-threshold": "8.0", "classical-penalty": "0.5",
    },
    {  # Quijano-Quinto, 2.0 dB, 2857 kb/s; exponent 0.9 fits Distrito-Concepcion (14.3 dB, 242 kb/s)
        "name": "toshiba-bb84-o", "vendor": "Toshiba", "model": "T12",
        "technology": "etsi-qkd-node-types:DV-QKD", "protocol": "BB84-decoy", "band": "O-band",
        "role-support": "etsi-qkd-node-types:TRANSCEIVER", "max-absorption": "24.0",
        "symbol-rate": "1000000000", "reference-skr": "2857.12", "reference-loss": "2.0",
        "loss-exponent": "0.9", "qber": "3.0", "qber-noise": "0.3", "qber-threshold": "11.0",
        "classical-penalty": "0.2",
    },
    {  # cloud scenario CCS-Rectorado, C-band, 23 km ~10 dB; rate assumed (T12 at 10 dB)
        "name": "toshiba-bb84-c", "vendor": "Toshiba", "model": "T12",
        "technology": "etsi-qkd-node-types:DV-QKD", "protocol": "BB84-decoy", "band": "C-band",
        "wavelength-range": "20-60", "role-support": "etsi-qkd-node-types:TRANSCEIVER",
        "max-absorption": "22.0", "symbol-rate": "1000000000", "reference-skr": "300.0",
        "reference-loss": "10.0", "loss-exponent": "0.9", "qber": "3.5", "qber-noise": "0.3",
        "qber-threshold": "11.0", "classical-penalty": "1.0",
    },
    {  # co-located domain, CV form with a loss limit (module docstring): reference Concepcion-Norte,
       # 7.4 kb/s at 11.9 dB (11.1 dB fibre + two 0.4 dB switches, as the lab's plant sees it);
       # exponent, loss-limit, span-penalty and max-skr fitted to the paper's CV table (npj Table 1)
       # and single links: all within 2x (tests/lab/test_cv_rates.py). Classical penalty 0.05: the
       # paper's CV rates on fibres with classical channels (Quijote-Quiron, 4 channels) show little
       # Raman penalty (the local oscillator filters), where 0.3 put them 2x low. 12.5 MBd, 23 dB budget.
        "name": "huawei-cv-c", "vendor": "Huawei", "model": "CV-QKD",
        "technology": "etsi-qkd-node-types:CV-QKD", "protocol": "CV-GG02", "band": "C-band",
        "wavelength-range": "1-96", "role-support": "etsi-qkd-node-types:TRANSCEIVER",
        "max-absorption": "23.0", "symbol-rate": "12500000", "reference-skr": "7.4",
        "reference-loss": "11.9", "loss-exponent": "2.4", "qber": "2.0", "qber-noise": "0.2",
        "qber-threshold": "6.0", "classical-penalty": "0.05", "loss-limit": "38.0",
        "span-penalty": "7.2", "max-skr": "10.8",
    },
    {  # cloud scenario CAIT-CCS: <= 3 dB span next to a 10 GbE C46 channel; rate assumed
        "name": "heqa-dv-o", "vendor": "HEQA Security", "model": "HEQA DV",
        "technology": "etsi-qkd-node-types:DV-QKD", "protocol": "BB84-decoy", "band": "O-band",
        "role-support": "etsi-qkd-node-types:TRANSCEIVER", "max-absorption": "20.0",
        "symbol-rate": "1000000000", "reference-skr": "20.0", "reference-loss": "3.0",
        "loss-exponent": "1.0", "qber": "3.0", "qber-noise": "0.3", "qber-threshold": "11.0",
        "classical-penalty": "0.2",
    },
    {  # AIT CV-QPSK, 100 MBd; rate and budget assumed
        "name": "ait-cv-qpsk", "vendor": "AIT", "model": "CV-QPSK",
        "technology": "etsi-qkd-node-types:CV-QKD", "protocol": "CV-QPSK", "band": "C-band",
        "wavelength-range": "20-60", "role-support": "etsi-qkd-node-types:TRANSCEIVER",
        "max-absorption": "15.0", "symbol-rate": "100000000", "reference-skr": "100.0",
        "reference-loss": "5.0", "loss-exponent": "1.2", "qber": "2.0", "qber-noise": "0.2",
        "qber-threshold": "6.0", "classical-penalty": "0.3",
    },
)

BUILTIN_PROFILES: dict[str, QkdProfile] = {e["name"]: QkdProfile.from_dict(e) for e in _BUILTIN}


def resolved_profile(topo: Mapping[str, Any], node: str, qkdi_id: int, name: str) -> QkdProfile:
    """The module's profile from the topology, calibrated to the measured rate of its link
    when the topology gives one (the rate was taken with the fibre's classical channels lit)."""
    entry = next((p for p in topo.get("profile", []) if p.get("name") == name), None)
    if entry is None:
        raise ValueError(f"profile '{name}' is not in the lab topology")
    profile = QkdProfile.from_dict(entry)
    endpoint = f"{node}:{qkdi_id}"
    fibres = {f["name"]: f for f in topo.get("fibre", [])}
    for link in topo.get("link", []):
        if endpoint in link.get("endpoints", []) and link.get("expected-skr") is not None and link.get("loss") is not None:
            # The measured rate was taken with the fibre's classical channels lit.
            classical = max(
                (sum(1 for c in fibres.get(f, {}).get("classical-channel", []) if c.get("band", "C-band") == profile.band) for f in link.get("path", [])),
                default=0,
            )
            return calibrate(profile, float(link["loss"]), float(link["expected-skr"]), same_band_classical=classical)
    return profile

"""Device-speed profiles: how much slower than its measured compute each simulated device is.

A profile is parsed from text (`uniform`, `lognormal:SIGMA`, `stragglers:FRACTION:SLOWDOWN`)
and turned into one slowdown factor >= 1 per device, deterministically from a seed, so every
strategy of a comparison sees the very same devices.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SpeedProfile:
    """A named heterogeneity profile with its parameters."""

    kind: Literal["uniform", "lognormal", "stragglers"]
    sigma: float = 0.0
    fraction: float = 0.0
    slowdown: float = 1.0

    def __str__(self) -> str:
        if self.kind == "lognormal":
            return f"lognormal:{self.sigma:g}"
        if self.kind == "stragglers":
            return f"stragglers:{self.fraction:g}:{self.slowdown:g}"
        return "uniform"


def parse_speed_profile(text: str) -> SpeedProfile:
    """Parse `uniform`, `lognormal:SIGMA` or `stragglers:FRACTION:SLOWDOWN`; ValueError if not."""
    name, *params = text.strip().split(":")
    try:
        values = [float(p) for p in params]
    except ValueError:
        raise ValueError(f"{text!r}: parameters must be numbers") from None
    if name == "uniform" and not values:
        return SpeedProfile("uniform")
    if name == "lognormal" and len(values) == 1 and 0 <= values[0] <= 5:
        return SpeedProfile("lognormal", sigma=values[0])
    if name == "stragglers" and len(values) == 2 and 0 <= values[0] <= 1 and 1 <= values[1] <= 1000:
        return SpeedProfile("stragglers", fraction=values[0], slowdown=values[1])
    raise ValueError(
        f"{text!r} is not a speed profile: use uniform, lognormal:SIGMA (0-5) or "
        "stragglers:FRACTION:SLOWDOWN (fraction 0-1, slowdown 1-1000)"
    )


def slowdowns(profile: SpeedProfile, devices: int, seed: int) -> list[float]:
    """Return each device's slowdown factor (>= 1), the same for the same seed."""
    rng = random.Random(f"speeds:{seed}")
    if profile.kind == "lognormal":
        draws = [math.exp(rng.gauss(0.0, profile.sigma)) for _ in range(devices)]
        fastest = min(draws)
        return [d / fastest for d in draws]
    if profile.kind == "stragglers":
        count = round(profile.fraction * devices)
        slow = set(rng.sample(range(devices), count))
        return [profile.slowdown if i in slow else 1.0 for i in range(devices)]
    return [1.0] * devices

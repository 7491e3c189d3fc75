"""Load profiles: the total rate over time, as steps.

    --profile "ramp 100 10000 60s; hold 10000 5m; burst 20000 2s every 10s for 1m; ramp 10000 0 30s"

    hold RATE DURATION                    RATE messages/s for DURATION
    ramp FROM TO DURATION                 the rate moves linearly from FROM to TO over DURATION
    burst RATE DUR every PERIOD [for T]   RATE for the first DUR of each PERIOD, the rate the step
                                          before ended at (0 if first) for the rest; lasts T (default
                                          one PERIOD)

Durations: `500ms`, `60s`, `5m`, `1h` or a plain number of seconds. Rates: messages per second
(fractions allowed, `10k` = 10000).

A worker sends what the profile's integral says is due: `count(t)` is the number of messages due
by t seconds after the start (times the worker's share), so over each step the count sent is
the step's integral whatever the tick (rounding error: one message), and a worker that falls
behind catches up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_DURATION = re.compile(r"([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    m = _DURATION.fullmatch(text.strip().lower())
    if not m:
        raise ValueError(f"{text!r} is not a duration (500ms, 60s, 5m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_rate(text: str) -> float:
    t = text.strip().lower()
    scale = 1000.0 if t.endswith("k") else 1.0
    try:
        rate = float(t.removesuffix("k")) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a rate (messages per second)") from None
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{text!r} must be a finite rate >= 0")
    return rate


@dataclass(frozen=True)
class Step:
    kind: str  # hold, ramp, burst
    duration: float
    start_rate: float  # hold: the rate; ramp: FROM; burst: the rate outside bursts
    end_rate: float  # hold: the rate; ramp: TO; burst: RATE
    burst: float = 0.0  # burst: DUR
    period: float = 0.0  # burst: PERIOD

    def text(self) -> str:
        if self.kind == "hold":
            return f"hold {self.start_rate:g} {self.duration:g}s"
        if self.kind == "ramp":
            return f"ramp {self.start_rate:g} {self.end_rate:g} {self.duration:g}s"
        return f"burst {self.end_rate:g} {self.burst:g}s every {self.period:g}s for {self.duration:g}s"

    def rate_at(self, t: float) -> float:
        if self.kind == "hold":
            return self.start_rate
        if self.kind == "ramp":
            return self.start_rate + (self.end_rate - self.start_rate) * t / self.duration
        return self.end_rate if t % self.period < self.burst else self.start_rate

    def count(self, t: float) -> float:
        """Messages due from the step's start to t seconds into it (0 <= t <= duration)."""
        if self.kind == "hold":
            return self.start_rate * t
        if self.kind == "ramp":
            return self.start_rate * t + (self.end_rate - self.start_rate) * t * t / (2 * self.duration)
        periods, rest = divmod(t, self.period)
        in_burst = periods * self.burst + min(rest, self.burst)
        return self.end_rate * in_burst + self.start_rate * (t - in_burst)

    @property
    def total(self) -> float:
        return self.count(self.duration)


@dataclass(frozen=True)
class Profile:
    steps: tuple[Step, ...]
    repeat: bool = False

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.steps)

    def locate(self, t: float) -> tuple[int, float, float]:
        """(step index, seconds into it, messages due before it) at t seconds after the start; past
        the end (no repeat): (len(steps), 0, total)."""
        loops = 0
        length = self.duration
        if self.repeat and t >= length:
            loops, t = divmod(t, length)
        done = loops * sum(s.total for s in self.steps)
        for i, step in enumerate(self.steps):
            if t < step.duration:
                return i, t, done
            t -= step.duration
            done += step.total
        return len(self.steps), 0.0, done

    def total_count(self) -> float:
        return sum(s.total for s in self.steps)

    def count(self, t: float) -> float:
        i, into, before = self.locate(t)
        return before if i == len(self.steps) else before + self.steps[i].count(into)

    def rate_at(self, t: float) -> float:
        i, into, _ = self.locate(t)
        return 0.0 if i == len(self.steps) else self.steps[i].rate_at(into)

    def finished(self, t: float) -> bool:
        return not self.repeat and t >= self.duration

    def state(self, t: float) -> dict:
        """The current step and target total rate, for /stats."""
        i, into, _ = self.locate(t)
        if i == len(self.steps):
            return {"step": None, "target_rate": 0.0, "finished": True}
        step = self.steps[i]
        return {"step": i + 1, "of": len(self.steps), "text": step.text(), "elapsed_s": round(into, 3), "target_rate": round(step.rate_at(into), 3)}


def parse_profile(text: str, repeat: bool = False) -> Profile:
    """Parse `--profile`; raises ValueError with a user-facing reason."""
    steps: list[Step] = []
    previous_end = 0.0
    for part in text.split(";"):
        words = part.split()
        if not words:
            continue
        kind = words[0].lower()
        try:
            if kind == "hold" and len(words) == 3:
                rate = parse_rate(words[1])
                step = Step("hold", parse_duration(words[2]), rate, rate)
            elif kind == "ramp" and len(words) == 4:
                step = Step("ramp", parse_duration(words[3]), parse_rate(words[1]), parse_rate(words[2]))
            elif kind == "burst" and len(words) in (5, 7) and words[3].lower() == "every" and (len(words) == 5 or words[5].lower() == "for"):
                burst, period = parse_duration(words[2]), parse_duration(words[4])
                if not 0 < burst <= period:
                    raise ValueError(f"burst duration must be > 0 and at most its period in {part.strip()!r}")
                step = Step("burst", parse_duration(words[6]) if len(words) == 7 else period, previous_end, parse_rate(words[1]), burst, period)
            else:
                raise ValueError(f"{part.strip()!r} is not a step (hold RATE DURATION; ramp FROM TO DURATION; burst RATE DURATION every PERIOD [for DURATION])")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if step.duration <= 0:
            raise ValueError(f"step {part.strip()!r} has no duration")
        steps.append(step)
        previous_end = step.start_rate if step.kind == "burst" else step.end_rate
    if not steps:
        raise ValueError("the profile has no steps")
    return Profile(tuple(steps), repeat)

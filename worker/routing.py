"""Which queries are clearly beyond the local model, and how raw confidence maps to P(adequate reply)."""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

CODE_HINTS = re.compile(
    r"```|\b(def|class|function|import|return|SELECT|INSERT|lambda|async|await|regex|compile|stack ?trace|"
    r"traceback|exception|segfault|python|javascript|java|rust|golang|sql|bash|docker|kubernetes|api|json|"
    r"algorithm|complexity|recursion)\b|[{};]\s*$|=>|::|\w+\(\)",
    re.IGNORECASE | re.MULTILINE,
)
TASK_HINTS = re.compile(
    r"\b(explain|summari[sz]e|translate|write|implement|compare|analy[sz]e|calculate|derive|prove|debug|refactor|"
    r"optimi[sz]e|design|describe|draft|plan|recipe|list \d+|step[- ]by[- ]step|in detail|pros and cons|difference between|essay|poem|"
    r"why does|why do|how does|how do i|how can i|what would happen)\b",
    re.IGNORECASE,
)
MIN_RAW = 1e-6  # raw confidence is a geometric-mean probability; 0 (an empty reply) is clamped to this
MATH = re.compile(r"\d+\s*[-+*/^%]\s*\d+|\b(integral|derivative|equation|matrix|probability)\b", re.IGNORECASE)


def looks_complex(text: str) -> str | None:
    """A reason when the query is clearly beyond a small chit-chat model (long, code, multi-part); else None."""
    words = text.split()
    if len(text) > 240 or len(words) > 15:
        return "long"
    if CODE_HINTS.search(text):
        return "code"
    if text.count("?") >= 2 or re.search(r"(^|\n)\s*(\d+[.)]|[-*•])\s+\S", text):
        return "multi-part"
    if MATH.search(text):
        return "math"
    if TASK_HINTS.search(text):
        return "task"
    return None


@dataclass
class Calibration:
    """Platt scaling: P(adequate reply) = sigmoid(slope * log(raw) + intercept), where log(raw) is the reply's
    mean token log-probability. Fitted by logistic regression on labelled replies; slope > 0, so it only rises."""

    slope: float = 1.0
    intercept: float = 0.0

    def __call__(self, raw: float) -> float:
        z = self.slope * math.log(max(raw, MIN_RAW)) + self.intercept
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

    def raw_for(self, calibrated: float) -> float:
        """The raw confidence at which the calibrated score reaches `calibrated` (0 < calibrated < 1)."""
        return math.exp((math.log(calibrated / (1 - calibrated)) - self.intercept) / self.slope)

    @classmethod
    def fit(cls, samples: list[tuple[float, bool]], l2: float = 1e-3, steps: int = 50) -> "Calibration":
        """Newton's method on the logistic loss over (raw confidence, adequate) pairs; a little L2 keeps it
        finite when the labels separate. Raises ValueError without both adequate and inadequate replies."""
        labels = {bool(ok) for _, ok in samples}
        if labels != {True, False}:
            raise ValueError("calibration needs both adequate and inadequate replies")
        xs = [math.log(max(raw, MIN_RAW)) for raw, _ in samples]
        ys = [1.0 if ok else 0.0 for _, ok in samples]
        a = b = 0.0
        for _ in range(steps):
            ga, gb, haa, hab, hbb = l2 * a, 0.0, l2, 0.0, 1e-9
            for x, y in zip(xs, ys):
                p = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, a * x + b))))
                w = p * (1 - p)
                ga, gb = ga + (p - y) * x, gb + (p - y)
                haa, hab, hbb = haa + w * x * x, hab + w * x, hbb + w
            det = haa * hbb - hab * hab
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
            a, b = a - da, b - db
            if abs(da) + abs(db) < 1e-10:
                break
        if a <= 0:
            raise ValueError("adequacy does not rise with the model's confidence: nothing to calibrate")
        return cls(a, b)

    def to_dict(self) -> dict:
        return {"method": "platt", "slope": self.slope, "intercept": self.intercept}

    @classmethod
    def load(cls, path) -> "Calibration | None":
        """The saved calibration; None when there is none or it is from an older format (fit it again)."""
        path = Path(path)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        if data.get("method") != "platt":
            return None
        return cls(float(data["slope"]), float(data["intercept"]))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

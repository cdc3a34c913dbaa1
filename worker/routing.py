"""Which queries are clearly beyond the local model, and how raw confidence maps to P(adequate reply)."""

import bisect
import json
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
    """Piecewise-constant map from the model's raw confidence to the measured share of adequate replies."""

    edges: list[float]  # ascending raw-confidence lower bounds of each bin
    adequate: list[float]  # share of adequate replies in each bin (made monotone)

    def __call__(self, raw: float) -> float:
        if not self.edges:
            return raw
        i = bisect.bisect_right(self.edges, raw) - 1
        return self.adequate[max(i, 0)]

    @classmethod
    def fit(cls, samples: list[tuple[float, bool]], bins: int = 8) -> "Calibration":
        """Equal-count bins of raw confidence, then pool adjacent violators so the map only goes up."""
        samples = sorted(samples)
        if not samples:
            return cls([], [])
        size = max(1, len(samples) // bins)
        groups = [samples[i:i + size] for i in range(0, len(samples), size)]
        blocks = [[g[0][0], sum(ok for _, ok in g), len(g)] for g in groups]
        merged: list[list] = []
        for block in blocks:
            merged.append(block)
            while len(merged) > 1 and merged[-2][1] / merged[-2][2] > merged[-1][1] / merged[-1][2]:
                last = merged.pop()
                merged[-1][1] += last[1]
                merged[-1][2] += last[2]
        return cls([0.0] + [b[0] for b in merged[1:]], [b[1] / b[2] for b in merged])

    def to_dict(self) -> dict:
        return {"edges": self.edges, "adequate": self.adequate}

    @classmethod
    def load(cls, path) -> "Calibration | None":
        path = Path(path)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(list(data["edges"]), list(data["adequate"]))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

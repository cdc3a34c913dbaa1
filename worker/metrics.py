"""Prometheus metrics without a dependency: counters, gauges and histograms with labels, rendered as text."""

import math
import threading
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str, quote: bool = True) -> str:
    """Label values escape backslash, newline and double quote; HELP text only the first two."""
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value.replace('"', '\\"') if quote else value


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...], le: str | None = None) -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if le is not None:
        pairs.append(f'le="{le}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class Registry:
    """The metrics of one process, rendered in the Prometheus text exposition format (version 0.0.4)."""

    def __init__(self):
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: "Metric") -> None:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(metric.render() for metric in metrics)


REGISTRY = Registry()


class Metric:
    """A named family of samples, one per combination of label values. Thread-safe."""

    kind = ""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (), registry: Registry = REGISTRY):
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._samples: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()
        if not self.label_names:
            self._samples[()] = self._zero()
        registry.register(self)

    def labels(self, *values) -> "Sample":
        """The sample for these label values; it is shown (at zero) from now on."""
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
        key = tuple(str(value) for value in values)
        with self._lock:
            self._samples.setdefault(key, self._zero())
        return Sample(self, key)

    def _zero(self):
        return 0.0

    def _add(self, key: tuple, amount: float) -> None:
        with self._lock:
            self._samples[key] = self._samples.get(key, 0.0) + amount

    def _get(self, key: tuple):
        with self._lock:
            value = self._samples.get(key, self._zero())
            return (list(value[0]), *value[1:]) if isinstance(value, tuple) else value

    def _lines(self, key: tuple, value) -> str:
        return f"{self.name}{_labels(self.label_names, key)} {_number(value)}\n"

    def render(self) -> str:
        with self._lock:
            samples = sorted(self._samples.items())
        return (f"# HELP {self.name} {_escape(self.help, quote=False)}\n# TYPE {self.name} {self.kind}\n"
                + "".join(self._lines(key, value) for key, value in samples))


class Sample:
    """One labelled sample of a metric: `inc`, `dec`, `set` or `observe`, as its metric's kind allows."""

    def __init__(self, metric: Metric, key: tuple[str, ...]):
        self.metric, self.key = metric, key

    def inc(self, amount: float = 1.0) -> None:
        self.metric.inc(amount, _key=self.key)

    def dec(self, amount: float = 1.0) -> None:
        self.metric.dec(amount, _key=self.key)

    def set(self, value: float) -> None:
        self.metric.set(value, _key=self.key)

    def observe(self, value: float) -> None:
        self.metric.observe(value, _key=self.key)

    def value(self):
        return self.metric._get(self.key)


class Counter(Metric):
    """A number that only goes up."""

    kind = "counter"

    def inc(self, amount: float = 1.0, *, _key: tuple = ()) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._add(_key, amount)

    def value(self) -> float:
        return self._get(())


class Gauge(Metric):
    """A number that goes up and down, or is read from a function at each scrape."""

    kind = "gauge"
    _function: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0, *, _key: tuple = ()) -> None:
        self._add(_key, amount)

    def dec(self, amount: float = 1.0, *, _key: tuple = ()) -> None:
        self._add(_key, -amount)

    def set(self, value: float, *, _key: tuple = ()) -> None:
        with self._lock:
            self._samples[_key] = float(value)

    def value(self) -> float:
        return self._get(())

    def set_function(self, function: Callable[[], float] | None) -> None:
        """Read the (unlabelled) value from `function` at each scrape; NaN when it fails."""
        self._function = function

    def render(self) -> str:
        if self._function is not None:
            try:
                self.set(self._function())
            except Exception:  # an unreachable source shows as NaN, never as a failed scrape
                self.set(math.nan)
        return super().render()


class Histogram(Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS, registry: Registry = REGISTRY):
        self.buckets = tuple(sorted(buckets))
        super().__init__(name, help_text, labels, registry)

    def _zero(self):
        return ([0] * len(self.buckets), 0.0, 0)  # cumulative bucket counts, sum, count

    def observe(self, value: float, *, _key: tuple = ()) -> None:
        with self._lock:
            counts, total, count = self._samples.get(_key, self._zero())
            counts = [seen + (value <= bound) for seen, bound in zip(counts, self.buckets)]
            self._samples[_key] = (counts, total + value, count + 1)

    def count(self, *labels) -> int:
        return self._get(tuple(str(label) for label in labels))[2]

    def _lines(self, key: tuple, value) -> str:
        counts, total, count = value
        names, out = self.label_names, []
        for bound, seen in zip(self.buckets, counts):
            out.append(f"{self.name}_bucket{_labels(names, key, _number(bound))} {seen}\n")
        out.append(f"{self.name}_bucket{_labels(names, key, '+Inf')} {count}\n")
        out.append(f"{self.name}_sum{_labels(names, key)} {_number(total)}\n")
        out.append(f"{self.name}_count{_labels(names, key)} {count}\n")
        return "".join(out)


def parse_samples(text: str) -> dict[str, float]:
    """Samples of a rendered page as {'name{labels}': value}: for tests and quick checks."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# ---- The worker's metrics (the front-end's are in bots/ops.py) ------------------------------------------------

MESSAGES = Counter("pioneer_messages_total", "Replies finished by this worker, by method.", ("method",))
REPLY_SECONDS = Histogram("pioneer_reply_seconds", "Time from taking a request to its final event, by method.",
                          ("method",))
QUEUE_WAIT_SECONDS = Histogram("pioneer_queue_wait_seconds", "Time requests waited in the queue.")
ERRORS = Counter("pioneer_errors_total", "Requests this worker answered with an error, by kind.", ("kind",))
CACHE_HITS = Counter("pioneer_cache_hits_total", "Local replies served from the attention cache.")
CACHE_MISSES = Counter("pioneer_cache_misses_total", "Local replies generated because the cache had none.")
OPENAI_TOKENS = Counter("pioneer_openai_tokens_total", "Tokens used by the OpenAI backend, by type.", ("type",))
IN_PROGRESS = Gauge("pioneer_requests_in_progress", "Requests this worker is answering now.")
QUEUE_DEPTH = Gauge("pioneer_queue_depth", "Requests waiting in the queue.")

for _method in ("local", "openai"):
    MESSAGES.labels(_method)
    REPLY_SECONDS.labels(_method)
for _type in ("prompt", "completion"):
    OPENAI_TOKENS.labels(_type)

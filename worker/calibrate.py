"""Calibrate the hybrid router: measure how often local replies are adequate at each raw confidence.

`pioneer calibrate [--model DIR] [--data FILE] [--write]` runs the local model on a labelled set of simple and
complex queries (worker/data/routing_eval.jsonl), fits the map raw confidence -> share of adequate replies on
the calibration split (Platt scaling), saves it as calibration.json beside the model (with --write), and reports
the reliability table and the routing on the held-out split.
"""

import argparse
import json
import logging
import re
from pathlib import Path

from .engine import LocalEngine
from .routing import Calibration, looks_complex

log = logging.getLogger(__name__)
DATA = Path(__file__).parent / "data" / "routing_eval.jsonl"
SYSTEM = "You are Pioneer, a friendly and helpful chat assistant."

# A simple query's local reply is adequate when it answers in kind: a greeting greets back, thanks get a
# "you're welcome", a question about its maker names one. tests/unit/test_routing.py pins what each accepts.
ADEQUATE = {
    "greeting": r"\b(hi|hello|hey|hiya|greetings|good (morning|afternoon|evening|day)|howdy|nice to (meet|see)|"
                r"how are you)\b",
    "wellbeing": r"\b(good|fine|well|great|ok|okay|not bad|alright|excellent|wonderful|can't complain|"
                 r"thanks for asking|certainly am)\b",
    "name": r"\b(my name|call me|pioneer)\b",
    "identity": r"\b(bot|chatbot|robot|ai|artificial|program|software|machine|computer|transformer|model|"
                r"not (a )?human)\b",
    "creator": r"\b(made|created|built|programm\w*|develop\w*|designed|wrote|written|team|engineers?|trained)\b",
    "thanks": r"\b(welcome|pleasure|no problem|any ?time|glad|happy to|you bet|don't mention it|no worries)\b",
    "bye": r"\b(bye|goodbye|see you|later|take care|farewell|talk soon|good night|come back)\b",
    "likes": r"^(yes|no|not really)\b|\bi (really |do |quite |also )?(like|love|enjoy|prefer|adore)\b|"
             r"\bfavou?rite\b|\bi('m| am) (a )?(big )?fan\b|\bi (don't|do not)\b",
    "joke": r"\?|\b(why|what do you call|knock|funny|joke|laugh|pun)\b",
    "feelings": r"^(yes|no|not really|sometimes)\b|\b(feel\w*|emotions?|happy|sad|bored|lonely|enjoy)\b",
}


def is_adequate(row: dict, reply: str) -> bool:
    if row["kind"] != "simple" or len(reply.split()) < 1:
        return False
    return re.search(ADEQUATE[row["topic"]], reply, re.IGNORECASE) is not None


def evaluate(engine: LocalEngine, rows: list[dict]) -> list[dict]:
    results = []
    for row in rows:
        reason = looks_complex(row["text"])
        result = dict(row, skipped=reason)
        if reason is None:
            reply = engine.reply([{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["text"]}])
            result |= {"reply": reply.text.strip(), "raw": reply.raw_confidence,
                       "adequate": is_adequate(row, reply.text)}
        results.append(result)
    return results


def routing(results: list[dict], calibration: Calibration, threshold: float) -> dict:
    def local(r):
        return r["skipped"] is None and calibration(r["raw"]) >= threshold

    out = {}
    for kind in ("simple", "complex"):
        rows = [r for r in results if r["kind"] == kind]
        answered = [r for r in rows if local(r)]
        out[kind] = {"queries": len(rows), "answered_locally": len(answered),
                     "share_local": round(len(answered) / max(1, len(rows)), 3),
                     "adequate_when_local": round(sum(r["adequate"] for r in answered) / max(1, len(answered)), 3)}
    return out


BANDS = (0.0, 0.5, 0.8, 0.9, 1.0)


def table(results: list[dict], calibration: Calibration) -> list[dict]:
    """Reliability table: for each band of calibrated score, its raw-confidence range, the mean predicted
    share of adequate replies and the share observed."""
    rows = []
    scored = [(calibration(r["raw"]), r) for r in results if r["skipped"] is None]
    for lo, hi in zip(BANDS, BANDS[1:]):
        members = [(p, r) for p, r in scored if lo <= p < hi or (hi == 1.0 and p == 1.0)]
        rows.append({"calibrated_from": lo, "calibrated_to": hi,
                     "raw_from": round(calibration.raw_for(lo), 3) if lo > 0 else 0.0,
                     "raw_to": round(min(1.0, calibration.raw_for(hi)), 3) if hi < 1 else 1.0,
                     "queries": len(members), "adequate": sum(r["adequate"] for _, r in members),
                     "predicted": round(sum(p for p, _ in members) / len(members), 3) if members else None,
                     "observed": round(sum(r["adequate"] for _, r in members) / len(members), 3) if members else None})
    return rows


def load_rows(path=DATA) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def fit(results: list[dict]) -> Calibration:
    return Calibration.fit([(r["raw"], r["adequate"]) for r in results if r["skipped"] is None])


def calibrate_and_save(engine: LocalEngine, out_path: Path) -> Calibration | None:
    """Fit the calibration of a freshly trained default model on the calibration split, and save it; None (raw
    confidence is used) when the model's replies give nothing to fit."""
    print(f"Calibrating the hybrid router's confidence on {DATA.name} (about 10 seconds)...", flush=True)
    try:
        calibration = fit(evaluate(engine, [r for r in load_rows() if r["split"] == "calibration"]))
    except ValueError as exc:
        log.warning("could not calibrate %s, routing on raw confidence: %s", out_path.parent, exc)
        return None
    calibration.save(out_path)
    return calibration


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="pioneer calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: MODEL_PATH or the default model)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--threshold", type=float, default=None, help="default: HYBRID_MODE_THRESHOLD")
    parser.add_argument("--write", action="store_true", help="save calibration.json beside the model")
    parser.add_argument("--show", action="store_true", help="print each held-out reply")
    args = parser.parse_args(argv)

    from .runtime import CALIBRATION_FILE, resolve_model_path
    from .settings import get_worker_settings

    settings = get_worker_settings()
    path = Path(args.model) if args.model else resolve_model_path(settings)
    threshold = settings.hybrid_mode_threshold if args.threshold is None else args.threshold
    engine = LocalEngine.load(path, max_new_tokens=settings.max_new_tokens)
    results = evaluate(engine, load_rows(args.data))
    fit_on = [r for r in results if r["split"] == "calibration"]
    held_out = [r for r in results if r["split"] == "held_out"]
    try:
        calibration = fit(fit_on)
    except ValueError as exc:
        parser.exit(1, f"cannot calibrate {path}: {exc}\n")
    if args.write:
        calibration.save(path / CALIBRATION_FILE)
    if args.show:
        for r in held_out:
            print(f"{r['kind']:7} {r['text'][:50]!r:55} -> {r.get('reply', '(skipped: ' + str(r['skipped']) + ')')[:60]!r}"
                  f" raw={r.get('raw', 0):.2f} ok={r.get('adequate')}")
    print(json.dumps({
        "model": str(path), "threshold": threshold, "calibration": calibration.to_dict(),
        "raw_confidence_at_threshold": round(calibration.raw_for(threshold), 3),
        "calibration_table": table(fit_on, calibration),
        "calibration_table_held_out": table(held_out, calibration),
        "routing_calibration_split": routing(fit_on, calibration, threshold),
        "routing_held_out": routing(held_out, calibration, threshold),
        "written": str(path / CALIBRATION_FILE) if args.write else None,
    }, indent=2))


if __name__ == "__main__":
    main()

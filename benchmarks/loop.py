"""The feedback loop on the city example with the real default model: serve → residents' conversations with thumbs
and corrections → `tailor improve` → canary → promoted, plus a deliberately broken candidate refused by the gates.

    python benchmarks/loop.py [--production-steps 40] [--residents 30]
        → benchmarks/results/loop.json (and runs/loop/, the workspace: registry, feedback.db, improve/)

1. Production: LoRA on the example's Q/A for --production-steps steps (short on purpose: a version that still
   gets questions wrong), registered and promoted as city@1.
2. A real server (create_app + uvicorn, `tailor serve --registry` in a thread) serves city@1 as `city`; each of the
   --residents residents asks one held-out question with the official openai client and judges the answer against
   the reference (token F1 >= 0.5: thumbs up, else thumbs down with the reference as the correction); the first
   correction also carries a private email address (redacted before training). Staff accept the corrections.
3. `tailor improve` with improve.train.learning_rate=1.0 (a huge step): refused by the gates, nothing served.
4. `tailor improve` as configured: trained on top of city@1, compared with it, canary started.
5. Canary traffic: new residents ask the same questions under `city` (the split is sticky per user), judging each
   answer the same way, until `tailor improve --decide` promotes or rolls back (at most --max-canary requests).

Figures: token F1 of production and candidate on the corrected questions and on the rest (held-out + regression),
the seconds from the last feedback to the promoted version (the good cycle, canary traffic included; the broken
cycle is reported apart), and the A/B counts. The canary's share and minimum samples are set for a benchmark
(share 0.5, 10 rated answers a side), not production use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "benchmarks" / "results" / "loop.json"
WORK = ROOT / "runs" / "loop"
EXAMPLE = ROOT / "examples" / "city-services"
# sized for a shared 2-core CPU: a few minutes per training, 20 held-out questions in the comparison. Replay 8
# production records per correction, 3 epochs at 1e-3: the earlier 2 records, 8 epochs at 2e-3 learnt the corrections
# (+0.79) but forgot the rest (-0.076, refused); replay 8 with 3 epochs at 5e-4 kept the rest (-0.019) but learnt little
# (+0.145), both measured on the same feedback (runs/loop)
IMPROVE = {"feedback_db": "feedback.db", "replay": 8, "train": {"epochs": 3, "learning_rate": 1.0e-3},
           "eval_limit": 20, "regression_size": 10, "min_gain": 0.1, "max_regression": 0.02,
           "canary_share": 0.5, "min_canary_samples": 10, "significance": 0.05}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def workspace(steps: int, work: Path = WORK, improve_settings: dict | None = None) -> Path:
    import yaml

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = yaml.safe_load((EXAMPLE / "tailor.yaml").read_text())
    raw["project"] = "city"
    raw["data"]["qa_files"] = [str(EXAMPLE / f) for f in raw["data"]["qa_files"]]
    raw["data"]["eval_files"] = [str(EXAMPLE / f) for f in raw["data"]["eval_files"]]
    raw.pop("sources", None)
    raw["train"].update({"max_steps": steps, "save_every": 0})
    raw["improve"] = {**IMPROVE, **(improve_settings or {})}
    (work / "tailor.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return work


def train_production(root: Path) -> None:
    from tailor.config import load_config
    from tailor.data.build import build_chat_data
    from tailor.registry import open_registry
    from tailor.train.run import run_training

    config, root = load_config(root)
    run_dir = root / "production"
    build_chat_data(config, root, run_dir)
    result = run_training(config, root, run_dir, show_progress=False)
    log(f"production trained: {result.steps} steps in {result.seconds:.0f} s, loss {result.train_loss:.3f}")
    registry = open_registry(config, root)
    registry.register_run(run_dir, "city", by="benchmark")
    registry.promote("city", 1, "production", by="benchmark", reason="first version")


class Server:
    """`tailor serve --registry` in a thread: production as `city`, canaries routed by the registry watcher."""

    def __init__(self, root: Path):
        import uvicorn

        from tailor.cli.serving import build_engine
        from tailor.config import load_config
        from tailor.registry import open_registry
        from tailor.serve.app import bind_socket, create_app
        from tailor.serve.registry_watch import RegistryWatcher

        config, root = load_config(root)
        self.engine = build_engine(config, root, None)
        self.watcher = RegistryWatcher(self.engine, open_registry(config, root), interval=0.5)
        serve = config.serve.model_copy(update={"feedback_db": str(root / "feedback.db"), "request_log": None,
                                                "cache_size": 0})
        app = create_app(self.engine, serve, root, watcher=self.watcher)
        self.watcher.start()
        sock = bind_socket("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.watcher.stop()
        self.engine.shutdown()


def questions(count: int) -> list[tuple[str, str]]:
    """The first `count` held-out questions of distinct facts (the example has several phrasings per fact)."""
    seen, chosen = set(), []
    for line in (EXAMPLE / "qa" / "eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["answer"] not in seen:
            seen.add(record["answer"])
            chosen.append((record["question"], record["answer"]))
    return chosen[:count]


def converse(url: str, question: str, user: str) -> tuple[str, str, str]:
    """(completion id, the model that answered, the answer) through the official client."""
    from openai import OpenAI

    reply = OpenAI(base_url=f"{url}/v1", api_key="none").chat.completions.create(
        model="city", user=user, temperature=0, max_tokens=40, messages=[{"role": "user", "content": question}])
    return reply.id, reply.model, reply.choices[0].message.content


def judge_and_send(url: str, response_id: str, answer: str, reference: str, correct: bool,
                   extra: str = "") -> tuple[int, str]:
    import httpx

    from tailor.evaluate.metrics import token_f1

    good = token_f1(answer, reference) >= 0.5
    body = {"response_id": response_id, "rating": "up" if good else "down"}
    if not good and correct:
        body["correction"] = reference + extra
    ack = httpx.post(f"{url}/v1/feedback", json=body, timeout=30)
    ack.raise_for_status()
    return ack.json()["id"], body["rating"]


def improve(root: Path, overrides: list[str], decide_only: bool = False) -> tuple[object, list[str], float]:
    from tailor.config import load_config
    from tailor.improve.pipeline import run_improve

    config, root = load_config(root, overrides)
    lines: list[str] = []
    started = time.perf_counter()
    outcome = run_improve(config, root, by="benchmark", show_progress=False, decide_only=decide_only,
                          say=lambda line: (lines.append(line), log(line)))
    return outcome, lines, time.perf_counter() - started


def run_loop(*, production_steps: int = 16, residents: int = 30, max_canary: int = 90, work: Path = WORK,
             improve_settings: dict | None = None, broken_candidate: bool = True) -> dict:
    """The whole loop in `work`; returns the figures loop.json holds (tests/integration/test_improve_loop.py runs a
    smaller one)."""
    began = time.perf_counter()
    load_before = os.getloadavg()
    root = workspace(production_steps, work, improve_settings)
    train_production(root)
    server = Server(root)
    try:
        from tailor.config import load_config
        from tailor.registry import open_registry
        from tailor.serve.feedback import FeedbackStore

        asked = questions(residents)
        corrections, ratings = [], {"up": 0, "down": 0}
        for i, (question, reference) in enumerate(asked):
            response_id, _, answer = converse(server.url, question, f"resident-{i}")
            extra = "" if corrections else " Or write to ann.lee@gmail.com."  # the first correction
            feedback_id, rating = judge_and_send(server.url, response_id, answer, reference, True, extra)
            ratings[rating] += 1
            if rating == "down":
                corrections.append(feedback_id)
        last_feedback = time.perf_counter()
        log(f"{residents} residents: {ratings['up']} up, {ratings['down']} down with corrections")
        store = FeedbackStore(root / "feedback.db")
        for feedback_id in corrections:
            store.review(feedback_id, "accepted", by="staff")
        store.close()

        broken_figures = None
        if broken_candidate:  # 16 steps are enough to wreck it at this learning rate
            broken, _, broken_seconds = improve(root, ["improve.train.learning_rate=1.0", "improve.train.max_steps=16",
                                                       "improve.folder=improve-broken"])
            log(f"broken candidate: {broken.outcome} in {broken_seconds:.0f} s")
            broken_figures = {"outcome": broken.outcome, "message": broken.message, "seconds": round(broken_seconds, 1)}
        good_started = time.perf_counter()
        good, good_lines, good_seconds = improve(root, [])
        log(f"good candidate: {good.outcome} in {good_seconds:.0f} s")
        config, _ = load_config(root)
        state = json.loads((root / "improve" / "state.json").read_text())
        cycle = state["current"] or state["history"][-1]
        figures = json.loads((root / "improve" / cycle["folder"] / "eval" / "comparison.json").read_text())

        decision, canary_requests = good, 0
        canary_started = time.perf_counter()
        if good.outcome == "waiting":
            while canary_requests < max_canary:
                for question, reference in asked:
                    response_id, model, answer = converse(server.url, question, f"canary-{canary_requests}")
                    judge_and_send(server.url, response_id, answer, reference, False)
                    canary_requests += 1
                    log(f"canary request {canary_requests}: {model}")
                    if canary_requests % 10 == 0:
                        decision, _, _ = improve(root, [], decide_only=True)
                        if decision.outcome != "waiting":
                            break
                if decision.outcome != "waiting":
                    break
        promoted_at = time.perf_counter()
        registry = open_registry(config, root)
        result = {
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_model": config.base_model, "example": "examples/city-services",
            "settings": {"production_steps": production_steps, "residents": residents,
                         "improve": config.improve.model_dump(mode="json"), "broken_learning_rate": 1.0,
                         "cpu_count": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads()},
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in os.getloadavg()]},
            "residents": {"up": ratings["up"], "down_with_correction": ratings["down"]},
            "broken_candidate": broken_figures,
            "candidate": {"outcome": good.outcome, "improve_seconds": round(good_seconds, 1),
                          "token_f1": figures["token_f1"], "questions": figures["questions"],
                          "corrected_gain": figures["corrected_gain"], "rest_change": figures["rest_change"]},
            "canary": {"requests": canary_requests, "decision": decision.outcome, "reason": decision.message,
                       "seconds": round(promoted_at - canary_started, 1)},
            "production_after": registry.resolve("city@production").label,
            "seconds_from_last_feedback_to_decision": round(promoted_at - last_feedback, 1),
            "seconds_good_cycle_to_decision": round(promoted_at - good_started, 1),
            "audit_log": [{"version": c.version.label, "action": c.action, "to": c.to_stage, "by": c.changed_by,
                           "reason": c.reason} for c in registry.history("city")],
            "total_seconds": round(time.perf_counter() - began, 1),
        }
    finally:
        server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--production-steps", type=int, default=16)
    parser.add_argument("--residents", type=int, default=30)
    parser.add_argument("--max-canary", type=int, default=90, help="Most canary requests before giving up.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_loop(production_steps=args.production_steps, residents=args.residents, max_canary=args.max_canary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}: corrected F1 gain {result['candidate']['corrected_gain']}, rest change "
        f"{result['candidate']['rest_change']}, decision {result['canary']['decision']}, "
        f"{result['seconds_from_last_feedback_to_decision']:.0f} s from the last feedback")


if __name__ == "__main__":
    main()

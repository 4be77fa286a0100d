"""One `tailor improve` run: take the lock, then advance the current cycle (starting one when none is open) as far
as it goes: through training and the canary's start, or to a decision on a running canary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.improve.state import LOCK_FILE, State, hold_lock
from tailor.registry.store import current_user
from tailor.workspace import read_json, write_json

STAGES = ("collect", "documents", "data", "train", "eval", "gates", "register", "canary", "decide")
# exit status of `tailor improve`: 0 the loop advanced (or waits, or promoted); 1 an error; 3 the candidate was
# refused by the gates or rolled back
REFUSED = 3


@dataclass
class Outcome:
    outcome: str  # nothing_to_learn, refused, waiting, promoted, rolled_back, no_canary
    message: str
    exit_code: int = 0


def improve_folder(config: TailorConfig, root: Path) -> Path:
    return (Path(root) / config.improve.folder).resolve()


def lock_path(config: TailorConfig, root: Path) -> Path:
    return Path(root) / config.improve.lock_file if config.improve.lock_file else \
        improve_folder(config, root) / LOCK_FILE


def model_name(config: TailorConfig) -> str:
    return config.improve.model or config.project


def run_improve(config: TailorConfig, root: Path, *, by: str | None = None, decide_only: bool = False,
                show_progress: bool = True, say: Callable[[str], None] = print) -> Outcome:
    from tailor.improve.compare import check_gates

    check_gates(config)
    with hold_lock(lock_path(config, root)):
        return Cycle(config, Path(root), current_user(by), show_progress, say).advance(decide_only)


class Cycle:
    def __init__(self, config: TailorConfig, root: Path, by: str, show_progress: bool, say):
        from tailor.registry import open_registry

        self.config, self.root, self.by, self.show_progress, self.say = config, root, by, show_progress, say
        self.name = model_name(config)
        self.registry = open_registry(config, root)
        self.state = State(improve_folder(config, root))

    def advance(self, decide_only: bool) -> Outcome:
        current = self.state.current
        if decide_only:
            if current is None or not self.state.done("canary"):
                return Outcome("no_canary", f"{self.name}: no canary is running; nothing to decide")
            return self.decide()
        if current is None:
            production = self.registry.resolve(f"{self.name}@production", verify=True)
            running = self.registry.active_canaries(self.name)
            if running:
                raise TailorError(f"{self.name}: a canary of {running[0].candidate.label} was started outside "
                                  f"this improve folder; end it before starting a cycle")
            current = self.state.start_cycle({"label": production.label, "id": production.id,
                                              "run_dir": production.run_dir})
            self.say(f"cycle {current['cycle']}: improving {production.label} in {self.state.cycle_dir()}")
        else:
            self.say(f"cycle {current['cycle']}: resuming after "
                     f"{', '.join(current['stages']) or 'nothing'} (improving {current['production']['label']})")
        for number, stage in enumerate(STAGES, start=1):
            if self.state.done(stage) and stage != "decide":
                continue
            self.say(f"[{number}/{len(STAGES)}] {stage}")
            ended = getattr(self, stage)()
            if ended is not None:
                return ended
        raise AssertionError("the decide stage always ends the run")

    # ---- stages: each returns an Outcome when the run ends there -------------------------------------------

    def production(self):
        """The version this cycle started from (it may have left production since; the cycle still compares with
        it)."""
        return next(v for v in self.registry.versions(self.name) if v.id == self.state.cycle["production"]["id"])

    def collect(self) -> Outcome | None:
        from tailor.improve.collect import collect, feedback_path

        production = self.production()
        db_path = feedback_path(self.config, self.root, production)
        found = collect(self.config, self.registry, self.name, production, db_path)
        for problem in found.problems:
            self.say(f"  [left out] {problem}")
        write_json(self.state.cycle_dir() / "collect" / "feedback.json", found.to_dict())
        counts = {"corrections": len(found.corrections), "rated": len(found.rated),
                  "regression": len(found.regression), "unanswered": len(found.unanswered),
                  "pending_review": found.pending_review, "left_out": len(found.problems)}
        redacted = sum(bool(c["redacted"]) for c in found.corrections)
        self.say(f"  {counts['corrections']} corrections ({redacted} with personal data redacted), "
                 f"{counts['rated']} rated answers, {counts['regression']} regression questions, "
                 f"{counts['unanswered']} unanswered questions, {found.pending_review} corrections awaiting review"
                 + (f"; other models' feedback left out: {found.other_models}" if found.other_models else ""))
        self.state.finish("collect", {"feedback_db": str(db_path), "counts": counts,
                                      "last_feedback_at": found.last_feedback_at,
                                      "output": str(self.state.cycle_dir() / "collect" / "feedback.json")})
        return None

    def documents(self) -> Outcome | None:
        from tailor.improve.documents import refresh_documents

        improve = self.config.improve
        found = (refresh_documents(self.config, self.root, self.production(), self.state.cycle_dir())
                 if improve.documents else {"status": "off (improve.documents: false)", "added": [], "changed": [],
                                            "removed": []})
        changes = ", ".join(f"{len(found[what])} {what}" for what in ("added", "changed", "removed") if found[what])
        self.say(f"  documents: {changes or found['status']}"
                 + (f"; index updated ({found['embedded']} chunks embedded, {found['reused']} reused)"
                    if found.get("index") else ""))
        self.state.finish("documents", found)
        collected = self.state.record("collect")
        counts = collected["counts"]
        usable = counts["corrections"] if improve.sft else counts["rated"]
        if (usable < improve.min_corrections or usable == 0) and not found.get("index"):
            what = "corrections" if improve.sft else "rated answers"
            reason = (f"{usable} new {what} (improve.min_corrections: {improve.min_corrections})"
                      + (f"; {counts['pending_review']} corrections await review (tailor feedback review)"
                         if counts["pending_review"] else "")
                      + ("; documents unchanged" if improve.documents and found["status"] == "unchanged" else ""))
            self.state.end_cycle("nothing_to_learn", reason)
            return Outcome("nothing_to_learn", f"nothing to learn: {reason}")
        return None

    def data(self) -> Outcome | None:
        from tailor.improve.build import build

        collected = read_json(self.state.record("collect")["output"])
        built = build(self.config, collected, Path(self.production().run_dir), self.state.cycle_dir())
        counts = built["counts"]
        self.say(f"  {counts['sft']} SFT records ({built['replayed']} replayed from production), {counts['kto']} "
                 f"KTO examples, {counts['dpo']} DPO pairs; comparison: {counts['comparison']} questions")
        self.state.finish("data", built)
        return None

    def train(self) -> Outcome | None:
        from tailor.improve.train import train_candidate

        counts = self.state.record("data")["counts"]
        trained = train_candidate(self.config, self.root, self.production(), self.state.cycle_dir(), counts,
                                  self.state.record("documents"), show_progress=self.show_progress,
                                  say=lambda line: self.say(f"  {line}"))
        self.state.finish("train", trained)
        return None

    def eval(self) -> Outcome | None:
        from tailor.improve.compare import compare

        result = compare(self.config, self.root, Path(self.production().run_dir),
                         Path(self.state.record("train")["candidate"]), self.state.cycle_dir() / "eval",
                         show_progress=self.show_progress)
        f1 = result["figures"]["token_f1"]
        self.say("  token F1        " + "  ".join(f"{name:>10}" for name in ("corrected", "heldout", "regression",
                                                                          "rest")))
        for model in ("production", "candidate"):
            self.say(f"  {model:<14}  " + "  ".join(_f(f1[model][name]) for name in ("corrected", "heldout",
                                                                                    "regression", "rest")))
        self.state.finish("eval", result)
        return None

    def gates(self) -> Outcome | None:
        from tailor.improve.compare import apply_gates

        evaluated = self.state.record("eval")
        failures = apply_gates(self.config, evaluated["figures"], read_json(evaluated["report"]))
        for line in failures:
            self.say(f"  [gate failed] {line}")
        if not failures:
            self.say("  gates passed")
        self.state.finish("gates", {"failures": failures, "passed": not failures})
        return None

    def register(self) -> Outcome | None:
        production = self.production()
        built, gates = self.state.record("data"), self.state.record("gates")
        figures = self.state.record("eval")["figures"]
        version = self.registry.register_run(
            self.state.record("train")["candidate"], self.name, production.label, by=self.by,
            reason=f"tailor improve cycle {self.state.cycle['cycle']}: {len(built['feedback_ids']['sft'])} "
                   f"corrections, corrected-question F1 {_signed(figures['corrected_gain'])}, rest "
                   f"{_signed(figures['rest_change'])}",
            feedback=(self.state.record("collect")["feedback_db"], built["feedback_ids"]))
        self.state.cycle["candidate"] = version.label
        self.say(f"  registered {version.label} (parent {production.label})")
        self.state.finish("register", {"version": version.version, "label": version.label})
        if not gates["passed"]:
            reason = "gates failed: " + "; ".join(gates["failures"])
            self.registry.decide(self.name, version.version, "archived", action="refuse", by=self.by, reason=reason)
            self.state.end_cycle("refused", reason)
            return Outcome("refused", f"{version.label} refused, {reason}; {production.label} stays in production",
                           REFUSED)
        return None

    def canary(self) -> Outcome | None:
        share = self.config.improve.canary_share
        registered = self.state.record("register")
        canary = self.registry.start_canary(
            self.name, registered["version"], share, by=self.by,
            reason=f"tailor improve: canary of {registered['label']} for {share:.0%} of {self.name}'s users; "
                   f"gates held")
        self.say(f"  canary: {canary.served_name} answers {share:.0%} of the users of '{self.name}' (a server with "
                 f"--registry follows within registry.poll_seconds)")
        self.state.finish("canary", {"canary_id": canary.id, "served_name": canary.served_name, "share": share})
        return None

    def decide(self) -> Outcome:
        from tailor.improve.decide import decide

        recorded = self.state.record("canary")
        canary = next((c for c in self.registry.canaries(self.name) if c.id == recorded["canary_id"]), None)
        if canary is None or canary.ended_at is not None:
            outcome = canary.outcome if canary is not None else "stopped"
            self.state.end_cycle(outcome or "stopped", "the canary was ended outside tailor improve")
            return Outcome(outcome or "stopped", f"{recorded['served_name']}: the canary was ended elsewhere "
                                                 f"({outcome}); the cycle is closed")
        decision = decide(self.config, self.root, Path(self.state.record("collect")["feedback_db"]), canary,
                          self.state.record("gates")["passed"])
        if decision.outcome == "waiting":
            self.say(f"  canary {canary.served_name}: {decision.reason}")
            return Outcome("waiting", f"canary {canary.served_name} running: {decision.reason}")
        self.registry.end_canary(canary.id, decision.outcome, by=self.by, reason=decision.reason)
        self.state.finish("decide", {"outcome": decision.outcome, "reason": decision.reason, "ab": decision.ab,
                                     "alerts": decision.alerts})
        self.state.end_cycle(decision.outcome, decision.reason)
        if decision.outcome == "promoted":
            return Outcome("promoted", f"{canary.served_name} promoted to production: {decision.reason}")
        return Outcome("rolled_back", f"{canary.served_name} rolled back (archived), {canary.control.label} keeps "
                                      f"production: {decision.reason}", REFUSED)


def _f(value) -> str:
    return f"{value:>10.3f}" if isinstance(value, int | float) else f"{'-':>10}"


def _signed(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"

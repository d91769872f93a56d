"""What the policy decided for a scan: a typed decision, and the record result.json keeps of it."""

from __future__ import annotations

from dataclasses import dataclass

from amdet_gate.result.enums import Verdict


@dataclass(frozen=True)
class AllowedBy:
    """The policy's allow entry that accepted this finding (docs/policy.md)."""

    rule: str  # AMDET001 or AMDET003
    file: str  # the policy file
    line: int  # of the entry in it
    expires: str  # ISO date
    statement: str  # why it is accepted, and by whom (untrusted text)

    def justification(self) -> str:
        """The sentence a report and a SARIF suppression show."""
        return f"{self.rule} allowed by {self.file} line {self.line} until {self.expires}: {self.statement}"


@dataclass(frozen=True)
class PolicyDecision:
    """The exit code a verdict gets under a policy, and why.

    `verdict` is the scan's verdict the decision was made on (the policy never changes it: an allowed
    finding is still a finding, it only no longer fails the gate); `allowed` the allow entry that accepted
    it; `warn_only` true when `on_finding`/`on_inconclusive: warn` turned a failing exit code into 0;
    `note` the one line the reports show.
    """

    exit_code: int
    verdict: Verdict
    allowed: AllowedBy | None = None
    warn_only: bool = False
    note: str = ""

    @property
    def passes(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, kw_only=True)
class PolicyRecord:
    """result.json's `policy`: which policy decided, and its decision (schema 1.3 adds `allowed`, `warn_only`)."""

    source: str  # the policy file, or "built-in default"
    sha256: str  # of the effective policy
    exit_code: int
    note: str
    model_line: int | None = None  # the policy line that names this model, for SARIF locations
    on_unscanned: str = "warn"
    allowed: AllowedBy | None = None
    warn_only: bool = False

    def decision(self, verdict: Verdict) -> PolicyDecision:
        return PolicyDecision(self.exit_code, verdict, self.allowed, self.warn_only, self.note)

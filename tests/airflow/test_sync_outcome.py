"""report_outcome's verdict: which runs end green and which fail, and the line each one logs."""

from __future__ import annotations

import pytest
from nova_flavor_sync_airflow import SyncFailedError, sync_outcome

PLAN = {"summary": {"to_update": 5, "digest": "d" * 64}}
APPROVED = {"choice": "Approve", "by": "alice", "at": "2026-12-02T10:00:00Z"}
REJECTED = {"choice": "Reject", "by": "bob", "at": "2026-12-02T10:00:00Z"}
BACKED_UP = {"backup_path": "/b", "records": 5, "diverged": []}
APPLIED = [{"updated": 3, "already": 0, "conflicts": 0, "errors": 0}, {"updated": 2, "already": 0}]
VERIFIED = {"to_update": 0}


def outcome(plan=PLAN, dry_run=False, backed_up=BACKED_UP, answer=APPROVED, applied=APPLIED, verified=VERIFIED):
    return sync_outcome(plan, dry_run=dry_run, backed_up=backed_up, answer=answer, applied=applied,
                        verified=verified)


def test_a_verified_sync_is_applied_and_adds_up_the_mapped_tasks():
    result = outcome()
    assert result["outcome"] == "applied" and result["updated"] == 5
    assert result["message"].startswith(f"APPLIED plan {'d' * 64} approved by alice")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"dry_run": True, "backed_up": None, "answer": None, "applied": None, "verified": None}, "dry_run"),
        ({"plan": {"summary": {"to_update": 0, "digest": "e" * 64}}, "backed_up": None, "answer": None,
          "applied": None, "verified": None}, "in_sync"),
        ({"answer": REJECTED, "applied": None, "verified": None}, "rejected"),
    ],
    ids=["dry-run", "nothing-to-do", "rejected"],
)
def test_runs_that_end_green(kwargs, expected):
    assert outcome(**kwargs)["outcome"] == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"plan": None}, "FAILED: checking the database or planning failed; nothing was written"),
        ({"backed_up": None, "answer": None, "applied": None, "verified": None},
         "FAILED: the backup could not be written; nothing was written"),
        ({"answer": None, "applied": None, "verified": None},
         "FAILED: the approve task ended without passing on an answer (see its log); nothing was written"),
        ({"applied": APPLIED[:1], "verified": None}, "FAILED: approved by alice at 2026-12-02T10:00:00Z, "
         "but applying or verifying failed: 3 flavor copies written"),
        ({"verified": None}, "but applying or verifying failed: 5 flavor copies written"),
    ],
    ids=["planning", "backup", "no-answer", "an-apply-task", "verify"],
)
def test_runs_that_fail_say_why_and_raise(kwargs, message):
    with pytest.raises(SyncFailedError, match="^FAILED") as failed:
        outcome(**kwargs)
    assert message in str(failed.value)
    assert failed.value.exit_code == 5

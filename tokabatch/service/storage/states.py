"""The eight OpenAI batch states and the ONE transition table.

Owns which status may follow which, and which `*_at` column a status write sets. The repository
(storage/repo.py) turns this table into compare-and-set UPDATEs; nothing else decides transitions.
Stdlib only: must not import torch, aiohttp or SQLAlchemy.
"""

from __future__ import annotations

import enum


class BatchStatus(str, enum.Enum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


S = BatchStatus

TERMINAL: frozenset[BatchStatus] = frozenset({S.FAILED, S.COMPLETED, S.EXPIRED, S.CANCELLED})
NON_TERMINAL: frozenset[BatchStatus] = frozenset(BatchStatus) - TERMINAL
CANCELLABLE: frozenset[BatchStatus] = frozenset({S.VALIDATING, S.IN_PROGRESS})

# to -> the statuses it may be entered from (contract §3.6). `failed` is also reachable from
# in_progress/finalizing for an unrecoverable internal error; `expired` from validating/finalizing
# because expiry can strike while a big file is still being validated or results are being sealed.
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset(),
    S.FAILED: frozenset({S.VALIDATING, S.IN_PROGRESS, S.FINALIZING}),
    S.IN_PROGRESS: frozenset({S.VALIDATING}),
    S.CANCELLING: CANCELLABLE,
    S.FINALIZING: frozenset({S.IN_PROGRESS}),
    S.COMPLETED: frozenset({S.FINALIZING}),
    S.EXPIRED: frozenset({S.VALIDATING, S.IN_PROGRESS, S.FINALIZING}),
    S.CANCELLED: frozenset({S.CANCELLING}),
}

# The timestamp column written together with each status (validating uses created_at at insert).
TIMESTAMP_FIELD: dict[BatchStatus, str] = {
    s: f"{s.value}_at" for s in BatchStatus if s is not S.VALIDATING
}


def allowed_from(to: BatchStatus) -> frozenset[BatchStatus]:
    """The statuses from which `to` may be entered."""
    return TRANSITIONS[BatchStatus(to)]


def can_transition(frm: BatchStatus | str, to: BatchStatus | str) -> bool:
    return BatchStatus(frm) in TRANSITIONS[BatchStatus(to)]


def is_terminal(status: BatchStatus | str) -> bool:
    return BatchStatus(status) in TERMINAL


__all__ = [
    "BatchStatus", "TERMINAL", "NON_TERMINAL", "CANCELLABLE", "TRANSITIONS", "TIMESTAMP_FIELD",
    "allowed_from", "can_transition", "is_terminal",
]

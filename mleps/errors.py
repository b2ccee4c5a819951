"""User errors: one line naming the problem and the fix, a non-zero exit, no traceback."""
from __future__ import annotations

import functools
import sys

USER_ERROR_EXIT = 2  # bad input or config
BAD_STEPS_EXIT = 3  # too many non-finite steps in a row
RANKS_DIVERGED_EXIT = 4  # processes of one run hold different parameters
INTERRUPTED_EXIT = 130  # SIGINT/SIGTERM: a checkpoint was saved, resume with resume=true


class UserError(Exception):
    """Something the user can fix; the message says what and how."""

    exit_code = USER_ERROR_EXIT

    def with_code(self, exit_code: int) -> "UserError":
        self.exit_code = exit_code
        return self


class TrainingDiverged(UserError):
    exit_code = BAD_STEPS_EXIT


class RanksDiverged(UserError):
    exit_code = RANKS_DIVERGED_EXIT


def exit_on_user_error(fn):
    """Turn a UserError into `error: <message>` on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if not getattr(e, "reported_by_main", False):  # several processes: the main one says it
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    return wrapper

"""User errors: one line naming the problem and the fix, a non-zero exit, no traceback."""
from __future__ import annotations

import functools
import hashlib
import os
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


_task_started = [False]  # Hydra's own errors come before the task; the task's own bugs keep their traceback


def exit_on_user_error(fn):
    """Turn a UserError into `error: <message>` on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _task_started[0] = True
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            # several processes: the main one says it, and an error every process meets at start (each checks
            # the same config) is said once per launch
            if not getattr(e, "reported_by_main", False) and first_to_report(str(e)):
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    return wrapper


def first_to_report(message: str) -> bool:
    """True unless another process of this launch already printed this message. torchrun (under `accelerate
    launch`) gives each process an error file in one folder per launch attempt
    (.../<run>/attempt_<n>/<local rank>/error.json): a marker there says who was first. Elsewhere: True."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not error_file:
        return True
    attempt = os.path.dirname(os.path.dirname(os.path.abspath(error_file)))
    marker = os.path.join(attempt, f"mleps-reported-{hashlib.sha256(message.encode()).hexdigest()[:16]}")
    try:
        os.makedirs(attempt, exist_ok=True)
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except OSError:  # nowhere to write the marker: better twice than never
        return True
    return True


def run_hydra(hydra_main) -> None:
    """Call a @hydra.main function; Hydra's own errors (an unknown key, group or option, a wrong
    type, a run dir it cannot create) become one `error: ...` line and exit 2, like ours."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # raise instead of printing a multi-line report and exiting 1
    _task_started[0] = False
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException, OSError) as e:
        if _task_started[0]:
            raise
        print(f"error: {hydra_message(e)}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def hydra_message(e: BaseException) -> str:
    """One line from Hydra's and OmegaConf's multi-line messages (internal *_schema options left out)."""
    chain, seen = [], e
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, UserError):  # raised by a resolver, e.g. the run dir's
            return str(err)
    from hydra.errors import HydraException

    if isinstance(e, OSError) and not isinstance(e, HydraException):  # Hydra's MissingConfigException is an OSError
        return f"cannot create the run dir {e.filename}: {e.strerror or e}: pass output_dir=A_WRITABLE_FOLDER"
    parts, options = [], []
    for err in chain:
        # Hydra lists its config search path after the options: where it looked, not what to type.
        for line in str(err).split("Config search path:")[0].splitlines():
            if line.startswith("\t"):
                if not line.strip().endswith("_schema"):
                    options.append(line.strip())
            elif line.strip() and not line[0].isspace() and not line.startswith("Set the environment") \
                    and line.strip() not in parts:
                parts.append(line.strip().rstrip(".:"))
    message = "; ".join(p for p in parts if not p.startswith("Available options"))
    return message + (f"; available: {', '.join(options)}" if options else "")

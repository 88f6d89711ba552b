"""Where a search study lives, and what happens to the trials of a worker that died.

Storages: any Optuna RDB URL (``sqlite:///PATH``, the default in the study folder, for the workers
of one machine; ``postgresql://...`` or ``mysql://...`` for workers on many machines) or
``journal:PATH`` (a journal file, e.g. on NFS).

A worker killed mid-trial (``kill -9``, OOM killer, a lost machine) leaves its trial RUNNING. One
mechanism deals with it per storage:

* RDB storages keep a heartbeat (every ``heartbeat`` seconds, one row per running trial, stamped with
  the database's clock). A trial whose heartbeat is older than ``grace_period`` is failed by the next
  worker that starts a trial or waits for the study to finish (Optuna's ``fail_stale_trials``), and
  :class:`RetryDeadTrial` queues its parameters again, once. This works across machines.
* A journal file has no heartbeat: at start, a worker fails the RUNNING trials whose owner, a process
  of this host, is gone, and queues them again the same way (a dead worker on another host stays
  RUNNING until a worker on that host starts again).

A trial that died is FAIL and not counted toward ``n_trials``: it has no ``fail_reason`` (a trial that
fails in a live worker always records one) or is marked ``interrupted`` (Ctrl-C, SIGTERM, or found
dead by the process check).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from solution.common import SolutionError

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
ACCEPTED = (
    "sqlite:///PATH, postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, mysql://USER[:PASSWORD]@HOST[:PORT]/DB "
    "(optionally with +DRIVER after the scheme) or journal:PATH"
)
DIED = "worker died mid-trial (no heartbeat; killed or crashed)"


# ---------------------------------------------------------------- storage


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        from sqlalchemy.engine.url import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def storage_url(cfg) -> str:
    """The configured storage, or ``sqlite:///{study folder}/study.db``."""
    if cfg.storage:
        return str(cfg.storage)
    return f"sqlite:///{(cfg.study_dir / 'study.db').resolve()}"


def grace_period(cfg) -> int:
    return int(cfg.grace_period or 3 * cfg.heartbeat)


def make_storage(cfg):
    """The study's storage: a journal file, or an RDB with a heartbeat (``heartbeat: 0`` turns it off)."""
    url = storage_url(cfg)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:") :]).expanduser()
        if not path.name:
            raise SolutionError(f"storage {url!r}: journal: needs a file path; accepted: {ACCEPTED}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise SolutionError(f"storage {url!r}: cannot open the journal file ({e.strerror or e})") from None
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme is None or scheme.split("+", 1)[0] not in RDB_SCHEMES:
        what = f"unknown scheme {scheme!r}" if scheme else "not a URL"
        raise SolutionError(f"storage {safe_url(url)!r}: {what}; accepted: {ACCEPTED}")
    import sqlalchemy.exc

    if scheme.startswith("sqlite"):
        try:
            Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # the database's own error below says what is wrong
    kwargs = {"connect_args": {"timeout": 60}} if scheme.startswith("sqlite") else {"pool_pre_ping": True}
    heartbeat = (
        {
            "heartbeat_interval": cfg.heartbeat,
            "grace_period": grace_period(cfg),
            "heartbeat_stale_trial_callback": RetryDeadTrial(cfg.retry_interrupted),
        }
        if cfg.heartbeat
        else {}
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **heartbeat)
    except ImportError as e:
        cause = e.__cause__ or e
        raise SolutionError(
            f"storage {safe_url(url)!r} needs a database driver ({cause}); "
            f"PostgreSQL's (psycopg) comes with pip install -e ."
        ) from None
    except sqlalchemy.exc.NoSuchModuleError as e:
        raise SolutionError(f"storage {safe_url(url)!r}: {e}; accepted: {ACCEPTED}") from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as e:
        first = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise SolutionError(
            f"cannot open storage {safe_url(url)!r}: {first[0] if first else type(e).__name__}"
        ) from None


def heartbeat_enabled(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


# ---------------------------------------------------------------- counting


def not_counted(t: FrozenTrial) -> bool:
    """A finished trial whose worker died or was interrupted: it does not count toward ``n_trials``."""
    if t.user_attrs.get("interrupted"):
        return True
    return t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: finished ones except those of dead or interrupted workers,
    plus running ones (a RUNNING trial that never got its worker attribute was killed at birth and is
    not counted)."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        if (t.state != TrialState.RUNNING or "worker" in t.user_attrs) and not not_counted(t)
    )


def running_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials that some worker started (and that a heartbeat will resolve if it died)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if "worker" in t.user_attrs]


# ---------------------------------------------------------------- dead workers


def requeue(study: optuna.Study, number: int, params: dict, user_attrs: dict) -> bool:
    """Queue the parameters of trial ``number`` once more (not a retry of a retry; nothing without params)."""
    if not params or "retry_of" in user_attrs:
        return False
    study.enqueue_trial(params, user_attrs={"retry_of": number})
    log.info("re-queued the parameters of trial %d", number)
    return True


class RetryDeadTrial:
    """Optuna's ``heartbeat_stale_trial_callback``: log a trial whose worker stopped beating, re-queue it once.

    Like Optuna's ``RetryHeartbeatStaleTrialCallback(max_retry=1)``, but the retry records ``retry_of``
    and starts with fresh user attributes (not the dead worker's)."""

    def __init__(self, retry: bool = True):
        self.retry = retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        worker = trial.user_attrs.get("worker") or {}
        log.warning(
            "trial %d: worker %s pid %s sent no heartbeat for the grace period: marked FAIL (not counted)",
            trial.number,
            worker.get("host", "?"),
            worker.get("pid", "?"),
        )
        if self.retry:
            requeue(study, trial.number, trial.params, trial.user_attrs)


def fail_dead_trials(study: optuna.Study, retry: bool) -> int:
    """Fail (and re-queue once) the trials of dead workers: by heartbeat where the storage keeps one,
    else by checking the owner process of trials started on this host. Returns how many were failed."""
    if heartbeat_enabled(study):
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # calls RetryDeadTrial for each
        return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
    n, me = 0, worker_info()
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") != me["host"] or _process_alive(worker.get("pid"), worker.get("started")):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"interrupted: worker pid {worker['pid']} died")
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        except Exception as e:  # e.g. a locked file while another worker does the same
            log.warning("could not mark interrupted trial %d as failed: %s", t.number, e)
            continue
        n += 1
        log.warning("trial %d was interrupted (worker pid %s died): marked FAIL", t.number, worker["pid"])
        if retry:
            requeue(study, t.number, t.params, t.user_attrs)
    return n


_WORKER: dict = {}


def worker_info() -> dict:
    """This process as a trial owner: host, pid and the pid's start time (pids are reused)."""
    if _WORKER.get("pid") != os.getpid():
        _WORKER.update(host=socket.gethostname(), pid=os.getpid(), started=_process_started(os.getpid()))
    return dict(_WORKER)


def _process_alive(pid: int | None, started: float | None) -> bool:
    if not pid:
        return True  # unknown: leave it alone
    try:
        import psutil

        proc = psutil.Process(pid)
        return started is None or abs(proc.create_time() - started) < 1.0
    except Exception:  # NoSuchProcess, AccessDenied, no psutil: fall back to a signal probe
        try:
            os.kill(pid, 0)
            return started is None
        except OSError:
            return False


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None

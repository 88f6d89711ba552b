"""Where a search study lives, and what happens to the trials of a worker that died.

Storages: an Optuna RDB URL (``sqlite:///PATH``, the default in the study folder, for the workers of
one machine; ``postgresql://`` or ``mysql://`` for many machines) or ``journal:PATH``. A worker killed
mid-trial leaves its trial RUNNING: RDB storages keep a heartbeat, and the next worker that starts a
trial or waits fails a trial silent for ``grace_period`` (any machine); a journal has none, so a
starting worker fails the RUNNING trials whose owner process on this host is gone. Either way the
parameters are queued again, once. A dead worker's trial is FAIL without ``fail_reason`` (a live
worker always records one) or marked ``interrupted``, and does not count toward ``n_trials``.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import warnings
from pathlib import Path

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from solution.common import SolutionError

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
ACCEPTED = (
    "sqlite:///PATH, postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, mysql://USER[:PASSWORD]@HOST[:PORT]/DB "
    "(optionally with +DRIVER after the scheme) or journal:PATH"
)
DIED = "worker died mid-trial (no heartbeat; killed or crashed)"


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        from sqlalchemy.engine.url import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def storage_url(cfg) -> str:
    """The configured storage, or ``sqlite:///{study folder}/study.db``."""
    return str(cfg.storage) if cfg.storage else f"sqlite:///{(cfg.study_dir / 'study.db').resolve()}"


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
    if scheme is None or scheme.split("+", 1)[0] not in ("sqlite", "postgresql", "mysql"):
        what = f"unknown scheme {scheme!r}" if scheme else "not a URL"
        raise SolutionError(f"storage {safe_url(url)!r}: {what}; accepted: {ACCEPTED}")
    import sqlalchemy.exc

    if scheme.startswith("sqlite"):
        try:
            Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # the database's own error below says what is wrong
    kwargs = {"connect_args": {"timeout": 60}} if scheme.startswith("sqlite") else {"pool_pre_ping": True}
    heartbeat = {"heartbeat_interval": cfg.heartbeat, "grace_period": grace_period(cfg)} if cfg.heartbeat else {}
    if cfg.heartbeat:
        heartbeat["heartbeat_stale_trial_callback"] = functools.partial(_stale, retry=cfg.retry_interrupted)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **heartbeat)
    except ImportError as e:
        raise SolutionError(
            f"storage {safe_url(url)!r} needs a database driver ({e.__cause__ or e}); "
            "PostgreSQL's (psycopg) comes with pip install -e ."
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


def not_counted(t: FrozenTrial) -> bool:
    """A finished trial whose worker died or was interrupted: it does not count toward ``n_trials``."""
    return bool(t.user_attrs.get("interrupted")) or (t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs)


def running_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials that a worker started (one killed at birth, before its worker attribute, is not)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if "worker" in t.user_attrs]


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: finished ones but those of dead or interrupted workers, and
    the running ones a worker started."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum((t.state != TrialState.RUNNING or "worker" in t.user_attrs) and not not_counted(t) for t in trials)


def requeue(study: optuna.Study, number: int, params: dict, user_attrs: dict) -> bool:
    """Queue the parameters of trial ``number`` once more (not a retry of a retry; nothing without params)."""
    if not params or "retry_of" in user_attrs:
        return False
    study.enqueue_trial(params, user_attrs={"retry_of": number})
    log.info("re-queued the parameters of trial %d", number)
    return True


def _stale(study: optuna.Study, trial: FrozenTrial, retry: bool) -> None:
    """Optuna's ``heartbeat_stale_trial_callback``: the retry (once) records ``retry_of`` and starts with
    fresh user attributes, not the dead worker's."""
    worker = trial.user_attrs.get("worker") or {}
    log.warning(
        "trial %d: worker %s pid %s sent no heartbeat for the grace period: marked FAIL (not counted)",
        trial.number,
        worker.get("host", "?"),
        worker.get("pid", "?"),
    )
    if retry:
        requeue(study, trial.number, trial.params, trial.user_attrs)


def fail_dead_trials(study: optuna.Study, retry: bool) -> None:
    """Fail (and re-queue once) the trials of dead workers: by heartbeat where the storage keeps one,
    else by checking the owner process of trials started on this host."""
    if heartbeat_enabled(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # calls _stale for each
        return
    me, storage = worker_info(), study._storage
    for t in running_trials(study):
        worker = t.user_attrs["worker"]
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
        log.warning("trial %d was interrupted (worker pid %s died): marked FAIL", t.number, worker["pid"])
        if retry:
            requeue(study, t.number, t.params, t.user_attrs)


@functools.cache
def _worker(pid: int) -> dict:
    return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}


def worker_info() -> dict:
    """This process as a trial owner: host, pid and the pid's start time (pids are reused)."""
    return dict(_worker(os.getpid()))


def _process_alive(pid: int | None, started: float | None) -> bool:
    if not pid:
        return True  # unknown: leave it alone
    try:
        created = psutil.Process(pid).create_time()
        return started is None or abs(created - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True

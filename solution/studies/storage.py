"""Where a search study lives, and the trials of dead workers. A trial whose worker ran on this host and is gone
is failed by the next worker here at once; one silent past ``grace_period`` (RDB heartbeat) by any worker. Either
way it does not count toward ``n_trials`` and its parameters are queued again, once."""

from __future__ import annotations

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
ACCEPTED = "sqlite:///PATH, postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, mysql://... (+DRIVER: any) or journal:PATH"
DIED = "worker died mid-trial (killed or crashed)"


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


def make_storage(cfg):
    """The study's storage: a journal file, or an RDB with a heartbeat (``heartbeat: 0`` turns it off)."""
    url = storage_url(cfg)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:") :]).expanduser()
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

    kwargs = {"connect_args": {"timeout": 60}} if scheme.startswith("sqlite") else {"pool_pre_ping": True}
    grace = cfg.grace_period or 3 * cfg.heartbeat
    heartbeat = {"heartbeat_interval": cfg.heartbeat, "grace_period": grace, "heartbeat_stale_trial_callback": requeue}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **(heartbeat if cfg.heartbeat else {}))
    except (ImportError, sqlalchemy.exc.SQLAlchemyError, OSError) as e:  # a missing driver, an unreachable server
        first = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise SolutionError(
            f"cannot open storage {safe_url(url)!r}: {first[0] if first else type(e).__name__}"
        ) from None


def not_counted(t: FrozenTrial) -> bool:
    """A finished trial whose worker died or was interrupted: it does not count toward ``n_trials``."""
    return bool(t.user_attrs.get("interrupted")) or (t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs)


def running_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials that a worker started (one killed at birth, before its worker attribute, is not)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if "worker" in t.user_attrs]


def counted_trials(study: optuna.Study) -> int:
    """Finished trials but those of dead or interrupted workers, and the running ones a worker started."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum((t.state != TrialState.RUNNING or "worker" in t.user_attrs) and not not_counted(t) for t in trials)


def requeue(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> None:
    """A trial that did not finish: its parameters queued once more (not a retry's; also Optuna's stale callback)."""
    again = bool(trial.params) and "retry_of" not in trial.user_attrs
    how = ": its parameters are queued again" if again else ""
    log.warning("trial %d did not finish (its worker died or was interrupted)%s", trial.number, how)
    if again:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail (and re-queue once) dead workers' trials: of this host's at once, the others' by heartbeat."""
    me, storage = worker_info(), study._storage
    for t in running_trials(study):
        worker = t.user_attrs["worker"]
        if worker.get("host") != me["host"] or _process_alive(worker.get("pid"), worker.get("started")):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_user_attr(t._trial_id, "fail_reason", DIED)
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        except Exception as e:  # e.g. a locked file while another worker does the same
            log.warning("could not mark the trial %d of a dead worker as failed: %s", t.number, e)
            continue
        requeue(study, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # with a heartbeat: calls requeue for each


def worker_info() -> dict:
    """This process as a trial owner: host, pid and the pid's start time (pids are reused)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _process_alive(pid: int | None, started: float | None) -> bool:
    if not pid:
        return True  # unknown: leave it alone
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    return started is None or abs(created - started) < 1.0

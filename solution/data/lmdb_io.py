"""cn_clip's LMDB layout, written and read without trusting pickle.

``{split}/imgs``: ``b"num_images"`` -> count, ``str(image_id)`` -> base64 of the image bytes.
``{split}/pairs``: ``b"num_samples"`` -> count, ``str(index)`` -> ``pickle((image_id, text_id, text))``.

This is exactly what ``cn_clip/preprocess/build_lmdb_dataset.py`` writes and what
``cn_clip.training.data.LMDBDataset`` reads. Pairs are read back through
:func:`restricted_loads`, which refuses any pickle that is not a plain ``(int, int, str)`` tuple.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from itertools import count, islice, starmap
from pathlib import Path

import lmdb

from solution.common import SolutionError

MAP_SIZE = 1 << 40  # sparse on Linux; the same 1 TiB cn_clip asks for
COMMIT_EVERY = 1000


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from an LMDB pair")


def restricted_loads(data: bytes) -> tuple[int, int, str]:
    """Unpickle one LMDB pair; only a tuple ``(int, int, str)`` is accepted, nothing is executed."""
    try:
        obj = _NoGlobals(io.BytesIO(bytes(data))).load()
    except Exception as e:
        raise SolutionError(f"refusing LMDB pair: {e}") from None
    if not (
        isinstance(obj, tuple)
        and len(obj) == 3
        and type(obj[0]) is int
        and type(obj[1]) is int
        and isinstance(obj[2], str)
    ):
        raise SolutionError(f"refusing LMDB pair: expected (int, int, str), got {type(obj).__name__}")
    return obj


def dumps_pair(image_id: int, text_id: int, text: str) -> bytes:
    return pickle.dumps((int(image_id), int(text_id), str(text)))


def _image_item(row) -> tuple[bytes, bytes]:
    image_id, b64 = row
    return (
        image_id if type(image_id) is bytes else b"%d" % int(image_id),
        b64.encode() if isinstance(b64, str) else b64,
    )


class _Flusher:
    """Sends a file's dirty pages to disk from a background thread each time it is poked, so the
    writer never waits on the disk mid-way and the final fsync has only the last pages left."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        self.poked, self.done = threading.Event(), False
        self.error: OSError | None = None  # a failed sync (e.g. a full disk), raised by the writer
        self.thread = threading.Thread(target=self._run, name="lmdb-flush", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self.poked.wait()
            self.poked.clear()
            if self.done:
                return
            try:
                os.fdatasync(self.fd)  # releases the GIL
            except OSError as e:  # not a traceback from a thread: the writer raises it (close)
                self.error = e
                return

    def poke(self) -> None:
        self.poked.set()

    def close(self) -> None:
        """Stop the thread; a sync that failed is raised here (once)."""
        if self.fd >= 0:
            self.done = True
            self.poked.set()
            self.thread.join()
            os.close(self.fd)
            self.fd = -1
            if self.error is not None:
                raise self.error


def _put_all(path: Path, items: Iterator[tuple[bytes, bytes]], count_key: bytes) -> int:
    """A fresh LMDB at ``path`` holding ``items`` and ``count_key`` -> their number; returns that number."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in ("data.mdb", "lock.mdb"):
        (path / stale).unlink(missing_ok=True)
    # no fsync per commit (the split is written once, in a temp dir, then swapped in): the pages go to
    # disk in the background as commits write them, and one sync at the end makes it all durable
    env = lmdb.open(str(path), map_size=MAP_SIZE, sync=False, metasync=False)
    flusher = _Flusher(path / "data.mdb")
    n = 0
    try:
        while True:
            with env.begin(write=True) as txn:  # commits, or aborts on an error
                done, _ = txn.cursor().putmulti(islice(items, COMMIT_EVERY))  # the loop runs in C
                n += done
                if done < COMMIT_EVERY:
                    txn.put(count_key, b"%d" % n)
                    break
            flusher.poke()
        flusher.close()
        env.sync(True)
    finally:
        try:
            flusher.close()  # already closed unless an error is on its way out: that one is raised
        except OSError:
            pass
        env.close()
    return n


def write_images(
    split_dir: str | os.PathLike, images: Iterable[tuple[int | bytes, bytes]], *, keyed: bool = False
) -> int:
    """Write ``split_dir/imgs`` (replacing it) from ``(image_id, base64)`` rows, the id an int or its
    decimal digits as bytes, the base64 any bytes-like (or str); returns ``num_images``. ``keyed``: every
    row is already ``(decimal digits as bytes, bytes-like)`` and goes to LMDB as it is (no Python per row)."""
    return _put_all(Path(split_dir) / "imgs", iter(images) if keyed else map(_image_item, images), b"num_images")


def write_pairs(split_dir: str | os.PathLike, pairs: Iterable[tuple[int, int, str]], *, exact: bool = False) -> int:
    """Write ``split_dir/pairs`` (replacing it) from ``(image_id, text_id, text)`` rows; returns ``num_samples``.
    ``exact``: every row is a tuple of exactly ``(int, int, str)``, pickled as it is (the same bytes)."""
    values = map(pickle.dumps, pairs) if exact else starmap(dumps_pair, pairs)
    return _put_all(Path(split_dir) / "pairs", zip(map(b"%d".__mod__, count()), values), b"num_samples")


def write_split(
    split_dir: str | os.PathLike, images: Iterable[tuple[int | bytes, bytes]], pairs: Iterable[tuple[int, int, str]]
) -> tuple[int, int]:
    """Write ``split_dir/imgs`` and ``split_dir/pairs``; returns ``(num_images, num_samples)``."""
    return write_images(split_dir, images), write_pairs(split_dir, pairs)


class LMDBSplit:
    """Read one split (``imgs`` + ``pairs``); safe to pickle into DataLoader workers (opens lazily)."""

    def __init__(self, split_dir: str | os.PathLike, need_pairs: bool = True):
        self.split_dir = Path(split_dir)
        self.need_pairs = need_pairs
        if self.split_dir.name == "imgs" and not (self.split_dir / "imgs").exists():
            self.split_dir, self.need_pairs = self.split_dir.parent, False  # given .../imgs directly
        for sub in ("imgs", "pairs") if self.need_pairs else ("imgs",):
            p = self.split_dir / sub
            if not (p / "data.mdb").is_file():
                raise SolutionError(
                    f"not an LMDB split: {p} has no data.mdb (build it with python -m solution.prepare)"
                )
        self._pid = None
        self._open()
        try:
            self.num_images = int(bytes(self._img.get(b"num_images")).decode())
            self.num_samples = int(bytes(self._pairs.get(b"num_samples")).decode()) if self.need_pairs else 0
        except (TypeError, ValueError):
            raise SolutionError(f"malformed LMDB split {self.split_dir}: missing num_images/num_samples") from None

    def _open(self) -> None:
        self._envs = []
        kw = dict(readonly=True, create=False, lock=False, readahead=False, meminit=False)
        env = lmdb.open(str(self.split_dir / "imgs"), **kw)
        self._envs.append(env)
        self._img = env.begin(buffers=True)
        self._pairs = None
        if self.need_pairs:
            env = lmdb.open(str(self.split_dir / "pairs"), **kw)
            self._envs.append(env)
            self._pairs = env.begin(buffers=True)
        self._pid = os.getpid()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked into a DataLoader worker: own handles
            self._open()

    def __getstate__(self):
        return {
            "split_dir": self.split_dir,
            "need_pairs": self.need_pairs,
            "num_images": self.num_images,
            "num_samples": self.num_samples,
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def pair(self, index: int) -> tuple[int, int, str]:
        self._check_pid()
        raw = self._pairs.get(str(index).encode())
        if raw is None:
            raise SolutionError(f"{self.split_dir}/pairs has no sample {index}")
        return restricted_loads(bytes(raw))

    def pairs(self) -> Iterator[tuple[int, int, str]]:
        for i in range(self.num_samples):
            yield self.pair(i)

    def image_b64(self, image_id: int) -> bytes | None:
        self._check_pid()
        raw = self._img.get(str(int(image_id)).encode())
        return None if raw is None else bytes(raw)

    def image_ids(self) -> list[int]:
        """All image ids in key order (the order cn_clip's feature extractor walks them)."""
        self._check_pid()
        ids = []
        for key in self._img.cursor().iternext(keys=True, values=False):
            key = bytes(key)
            if key != b"num_images":
                ids.append(int(key.decode()))
        return ids

    def images_digest(self) -> str:
        """sha256 of every key and value of ``imgs``, in key order: identifies the gallery by content."""
        import hashlib

        self._check_pid()
        h = hashlib.sha256()
        for key, value in self._img.cursor():
            for part in (bytes(key), bytes(value)):
                h.update(len(part).to_bytes(8, "little"))
                h.update(part)
        return h.hexdigest()

    def queries(self) -> OrderedDict[int, tuple[str, list[int]]]:
        """text_id -> (text, [image_ids]) gathered from the pairs, in first-seen order."""
        out: OrderedDict[int, tuple[str, list[int]]] = OrderedDict()
        for image_id, text_id, text in self.pairs():
            if text_id not in out:
                out[text_id] = (text, [])
            out[text_id][1].append(image_id)
        return out

    def close(self) -> None:
        for env in getattr(self, "_envs", []):
            env.close()
        self._envs = []

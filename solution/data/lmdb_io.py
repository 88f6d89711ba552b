"""cn_clip's LMDB layout (what its ``build_lmdb_dataset.py`` writes and ``LMDBDataset`` reads), written and read
without trusting pickle. ``{split}/imgs``: ``b"num_images"`` -> count, ``b"%d" % image_id`` -> base64 of the image;
``{split}/pairs``: ``b"num_samples"`` -> count, ``b"%d" % index`` -> ``pickle((image_id, text_id, text))``."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Iterator
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
    if not (isinstance(obj, tuple) and len(obj) == 3 and [type(x) for x in obj] == [int, int, str]):
        raise SolutionError(f"refusing LMDB pair: expected (int, int, str), got {obj!r:.80}")
    return obj


class Writer(contextlib.AbstractContextManager):
    """A fresh LMDB at ``path``, written in commits of :data:`COMMIT_EVERY`; on a clean exit the count goes
    under ``count_key`` and everything is synced once (the split is swapped in only afterwards)."""

    def __init__(self, path: str | os.PathLike, count_key: bytes):
        self.path, self.count_key, self.n = Path(path), count_key, 0
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in ("data.mdb", "lock.mdb"):
            (self.path / stale).unlink(missing_ok=True)
        self.env = lmdb.open(str(self.path), map_size=MAP_SIZE, sync=False, metasync=False)
        self.txn = self.env.begin(write=True)

    def put(self, key: bytes, value: bytes) -> None:
        self.txn.put(key, value)
        self.n += 1
        if self.n % COMMIT_EVERY == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self.txn.put(self.count_key, b"%d" % self.n)
                self.txn.commit()
                self.env.sync(True)
        finally:
            self.env.close()  # (aborts an open transaction)


def write_images(split_dir: str | os.PathLike, images: Iterable[tuple[int, bytes | str]]) -> int:
    """Write ``split_dir/imgs`` (replacing it) from ``(image_id, base64)`` rows; returns ``num_images``."""
    with Writer(Path(split_dir) / "imgs", b"num_images") as w:
        for image_id, b64 in images:
            w.put(b"%d" % int(image_id), b64.encode() if isinstance(b64, str) else bytes(b64))
    return w.n


def write_pairs(split_dir: str | os.PathLike, pairs: Iterable[tuple[int, int, str]]) -> int:
    """Write ``split_dir/pairs`` (replacing it) from ``(image_id, text_id, text)`` rows; returns ``num_samples``."""
    with Writer(Path(split_dir) / "pairs", b"num_samples") as w:
        for image_id, text_id, text in pairs:
            w.put(b"%d" % w.n, pickle.dumps((int(image_id), int(text_id), str(text))))
    return w.n


def write_split(split_dir: str | os.PathLike, images: Iterable, pairs: Iterable) -> tuple[int, int]:
    """Write ``split_dir/imgs`` and ``split_dir/pairs``; returns ``(num_images, num_samples)``."""
    return write_images(split_dir, images), write_pairs(split_dir, pairs)


class LMDBSplit:
    """Read one split (``imgs`` + ``pairs``); safe to pickle into DataLoader workers (each process opens its own)."""

    def __init__(self, split_dir: str | os.PathLike, need_pairs: bool = True):
        self.split_dir, self.need_pairs = Path(split_dir), need_pairs
        if self.split_dir.name == "imgs" and not (self.split_dir / "imgs").exists():
            self.split_dir, self.need_pairs = self.split_dir.parent, False  # given .../imgs directly
        for sub in ("imgs", "pairs") if self.need_pairs else ("imgs",):
            if not (self.split_dir / sub / "data.mdb").is_file():
                raise SolutionError(f"not an LMDB split: {self.split_dir / sub} has no data.mdb (see solution.prepare)")
        self._open()
        try:
            self.num_images = int(bytes(self._txn("imgs").get(b"num_images")))
            self.num_samples = int(bytes(self._txn("pairs").get(b"num_samples"))) if self.need_pairs else 0
        except (TypeError, ValueError):
            raise SolutionError(f"malformed LMDB split {self.split_dir}: missing num_images/num_samples") from None

    def _open(self) -> None:
        kw = dict(readonly=True, create=False, lock=False, readahead=False, meminit=False)
        subs = ("imgs", "pairs")[: 1 + self.need_pairs]
        self._envs = {sub: lmdb.open(str(self.split_dir / sub), **kw) for sub in subs}
        self._txns = {sub: env.begin(buffers=True) for sub, env in self._envs.items()}
        self._pid = os.getpid()

    def _txn(self, which: str):
        if self._pid != os.getpid():  # forked into a DataLoader worker: own handles
            self._open()
        return self._txns[which]

    def __reduce__(self):
        return LMDBSplit, (self.split_dir, self.need_pairs)

    def pair(self, index: int) -> tuple[int, int, str]:
        raw = self._txn("pairs").get(b"%d" % index)
        if raw is None:
            raise SolutionError(f"{self.split_dir}/pairs has no sample {index}")
        return restricted_loads(bytes(raw))

    def pairs(self) -> Iterator[tuple[int, int, str]]:
        return map(self.pair, range(self.num_samples))

    def image_b64(self, image_id: int) -> bytes | None:
        raw = self._txn("imgs").get(b"%d" % int(image_id))
        return None if raw is None else bytes(raw)

    def image_ids(self) -> list[int]:
        """All image ids in key order (the order cn_clip's feature extractor walks them)."""
        keys = self._txn("imgs").cursor().iternext(keys=True, values=False)
        return [int(bytes(k)) for k in keys if bytes(k) != b"num_images"]

    def images_digest(self) -> str:
        """sha256 of every key and value of ``imgs``, in key order: identifies the gallery by content."""
        h = hashlib.sha256()
        for key, value in self._txn("imgs").cursor():
            for part in (bytes(key), bytes(value)):
                h.update(len(part).to_bytes(8, "little"))
                h.update(part)
        return h.hexdigest()

    def queries(self) -> OrderedDict[int, tuple[str, list[int]]]:
        """text_id -> (text, [image_ids]) gathered from the pairs, in first-seen order."""
        out: OrderedDict[int, tuple[str, list[int]]] = OrderedDict()
        for image_id, text_id, text in self.pairs():
            out.setdefault(text_id, (text, []))[1].append(image_id)
        return out

    def close(self) -> None:
        for env in getattr(self, "_envs", {}).values():
            env.close()
        self._envs = {}

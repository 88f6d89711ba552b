"""What ``solution.prepare`` counts and lists for one output split: the ledger, ``report.json``'s dict
and the summary line logged for it.

:class:`Ledger` accounts for every image (kept, converted, skipped with its reason, a repeated id)
and yields the split's pairs from its texts and the images it kept; :func:`split_report` turns it
into the report written as ``LMDB_DIR/{split}/report.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from .images import REASONS
from .inputs import SplitInput, Text

SKIP_REASONS = {
    **REASONS,
    "missing_file": "the image file does not exist or cannot be read",
    "malformed_line": "the line is not image_id<TAB>base64",
    "bad_id": "the image id is not an integer",
    "duplicate_id": "an image with this id was already stored (the first one wins)",
}
LIST_CONVERTED = 1000  # list at most this many converted images by id in a report


class Ledger:
    """Counts and lists for one output split's report."""

    def __init__(self, name: str, texts: list[Text] | None):
        self.name, self.texts = name, texts
        self.counts = Counter()
        self.by_reason, self.by_action, self.formats = Counter(), Counter(), Counter()
        self.skipped: list[dict] = []
        self.duplicates: list[dict] = []
        self.converted: list[dict] = []
        self.kept_ids: set[int] = set()

    def image(self, where, image_id, status, reason, detail, actions, fmt) -> None:
        self.counts["images_total"] += 1
        if fmt:
            self.formats[fmt] += 1
        if status == "skipped":
            entry = {"image_id": image_id, "where": where, "reason": reason, "detail": detail}
            if reason == "duplicate_id":
                self.duplicates.append(entry)
            else:
                self.skipped.append(entry)
                self.by_reason[reason] += 1
            return
        self.kept_ids.add(image_id)
        self.counts[status] += 1
        if status == "converted":
            self.by_action.update(actions)
            if len(self.converted) < LIST_CONVERTED:
                self.converted.append({"image_id": image_id, "format": fmt, "actions": actions})

    def pairs(
        self, skipped_texts: list[dict], partial: list[dict], *, optimistic: bool = False
    ) -> Iterator[tuple[int, int, str]]:
        """The pairs of the texts with their kept images (``optimistic``: as if every image were kept,
        to be written before the images are known; check :meth:`referenced` against the kept ones)."""
        kept = self.kept_ids
        all_kept = (lambda ids: True) if optimistic else kept.issuperset
        unlabelled = texts_kept = dropped = 0
        for t in self.texts:
            ids = t.image_ids
            if ids is None:
                unlabelled += 1
                continue
            if all_kept(ids):  # the common case
                texts_kept += 1
                for image_id in ids:
                    yield image_id, t.text_id, t.text
                continue
            present = [i for i in ids if i in kept]
            missing = [i for i in ids if i not in kept]
            if not present:
                skipped_texts.append(
                    {"text_id": t.text_id, "reason": "no_images", "detail": f"none of its images survived: {missing}"}
                )
                continue
            partial.append({"text_id": t.text_id, "missing_image_ids": missing})
            dropped += len(missing)
            texts_kept += 1
            for image_id in present:
                yield image_id, t.text_id, t.text
        c = self.counts  # set, not added: a second pass replaces an optimistic one
        c["texts_total"], c["texts_unlabelled"], c["texts_kept"], c["pairs_dropped"] = (
            len(self.texts),
            unlabelled,
            texts_kept,
            dropped,
        )

    def referenced(self) -> Iterator[int]:
        """Every image id the texts refer to."""
        return chain.from_iterable(t.image_ids or () for t in self.texts)

    def kept_texts(self) -> list[dict]:
        """The texts with at least one kept image, each with only its kept images (a MUGE texts file's rows)."""
        kept = self.kept_ids
        return [
            {"text_id": t.text_id, "text": t.text, "image_ids": [i for i in t.image_ids if i in kept]}
            for t in self.texts
            if t.image_ids and any(i in kept for i in t.image_ids)
        ]


def split_report(
    ledger: Ledger,
    split: SplitInput | None,
    skipped_texts,
    partial,
    num_images,
    num_samples,
    seconds,
    source: str,
    out_dir: Path,
) -> dict:
    """``report.json`` of one output split (``split``: the input whose text problems it reports, if any)."""
    c = ledger.counts
    problems = split.problems if split else []
    return {
        "split": ledger.name,
        "source": source,
        "lmdb": str(out_dir),
        "num_images": num_images,
        "num_samples": num_samples,
        "images": {
            "total": c["images_total"],
            "kept": c["kept"],
            "converted": c["converted"],
            "skipped": len(ledger.skipped),
            "duplicates": len(ledger.duplicates),
            "skipped_by_reason": dict(ledger.by_reason),
            "converted_by_action": dict(ledger.by_action),
            "formats": dict(ledger.formats),
        },
        "texts": {
            "total": c["texts_total"] + len(problems),
            "kept": c["texts_kept"],
            "unlabelled": c["texts_unlabelled"],
            "skipped": len(skipped_texts) + len(problems),
            "with_missing_images": len(partial),
        },
        "pairs": {"written": num_samples, "dropped_missing_image": c["pairs_dropped"]},
        "reasons": {
            k: SKIP_REASONS.get(k, k) for k in sorted(ledger.by_reason) + ["duplicate_id"] * bool(ledger.duplicates)
        },
        "skipped_images": ledger.skipped,
        "duplicate_images": ledger.duplicates,
        "skipped_texts": problems + skipped_texts,
        "texts_with_missing_images": partial,
        "converted_images": ledger.converted,
        "converted_images_listed": len(ledger.converted),
        "seconds": round(seconds, 3),
        "images_per_second": round(c["images_total"] / seconds, 1) if seconds > 0 else None,
    }


def summary_line(r: dict) -> str:
    """One line saying what a report counts."""
    im, tx = r["images"], r["texts"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(im["skipped_by_reason"].items()))
    return (
        f"{r['split']}: {im['total']} images -> {r['num_images']} stored ({im['kept']} kept, {im['converted']} "
        f"converted, {im['skipped']} skipped{': ' + reasons if reasons else ''}, {im['duplicates']} duplicate ids); "
        f"{tx['total']} texts -> {tx['kept']} with images, {tx['unlabelled']} unlabelled, {tx['skipped']} skipped; "
        f"{r['num_samples']} pairs in {r['lmdb']} ({r['images_per_second']} images/s)"
    )

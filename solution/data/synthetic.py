"""A deterministic, procedurally drawn image-text dataset in MUGE layout, for the demo and the tests: one or two
groups of shapes on a plain background per image, a query naming them (``fine``: also sizes and places), a few
messy images, and ``general/``: a larger family standing in for pretraining data. ``demo_info.json`` sums it up."""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from solution.common import SolutionError, atomic_path, write_json, write_jsonl

COLORS = ("红色", "绿色", "蓝色", "黄色", "紫色", "橙色", "黑色", "白色")  # of the shapes
BACKGROUNDS = ("浅蓝色", "浅绿色", "浅灰色", "米黄色", "粉色", "深灰色")
RGB = {
    "红色": (215, 40, 40),
    "绿色": (40, 160, 60),
    "蓝色": (40, 80, 215),
    "黄色": (240, 200, 30),
    "紫色": (140, 60, 180),
    "橙色": (245, 130, 25),
    "黑色": (25, 25, 25),
    "白色": (250, 250, 250),
    "浅蓝色": (195, 222, 250),
    "浅绿色": (205, 240, 205),
    "浅灰色": (212, 212, 212),
    "米黄色": (245, 234, 195),
    "粉色": (250, 210, 222),
    "深灰色": (75, 75, 75),
}
SHAPES = ("圆形", "三角形", "正方形", "五角星", "十字形")
SIZES, SIDES = ("大", "小"), ("左边", "右边", "上方", "下方")  # SIDES: one group's half of the image
PAIRS = (("左边", "右边"), ("上方", "下方"))  # two groups: where each one is
# the half of the image (x0, x1, y0, y1 as fractions of the side) each place puts a group in
REGIONS = {"左边": (0, 0.5, 0, 1), "右边": (0.5, 1, 0, 1), "上方": (0, 1, 0, 0.5), "下方": (0, 1, 0.5, 1)}
FINE_RADIUS = {"大": (0.14, 0.17), "小": (0.085, 0.10)}  # radius (fraction of the side) by size
# radius range (fraction of the side) by the total number of shapes in the image
_RADIUS = {1: (0.20, 0.32), 2: (0.14, 0.22), 3: (0.11, 0.17), 4: (0.10, 0.15), 5: (0.09, 0.13)}
COUNTS = {1: "一个", 2: "两个", 3: "三个"}

# the general family phrases things otherwise and, as web captions do, often names only part of the scene
GENERAL_TEMPLATES = ("一张{bg}底色的图片，画着{groups}", "{groups}，背景是{bg}", "图中有{groups}，底色{bg}")
GENERAL_PARTIAL = ("图中有{count}{color}的{shape}", "{color}的{shape}", "{bg}底色上的{color}{shape}")
FINE_PARTIAL = (
    "图中有{count}{color}的{size}{shape}",
    "{where}有{color}的{shape}",
    "{color}的{size}{shape}",
    "{bg}底色上的{color}{shape}",
)

# id ranges: (image id base, text id base) per split / family
SPLITS = ("train", "valid", "test", "general/train", "general/valid")
ID_BASES = {name: (k * 1_000_000, k * 10_000) for k, name in enumerate(SPLITS, 1)}
# deliberately messy images per split, in order, each the first image of a different query
MESS = {
    "train": ("gif_animated", "png_rgba", "truncated", "html", "gif", "png_palette"),
    "valid": ("gif", "png_rgba"),
    "test": ("png_palette", "gif_animated"),
    "general/train": ("gif", "png_rgba", "truncated", "gif_animated"),
    "general/valid": ("png_palette",),
}
BAD_KINDS = ("truncated", "html")  # the ones prepare must drop


@dataclass(frozen=True)
class Sizes:
    train_queries: int
    valid_queries: int
    test_queries: int
    images_per_query: int
    general_train_images: int
    general_valid_images: int
    two_group_fraction: float  # share of scenes with a second group ("...和一个蓝色的圆形")
    fine: int = 0  # 1: every group also has a size (大/小) and a place (左边/右边/上方/下方)


PRESETS = {
    "tiny": Sizes(6, 3, 3, 2, 24, 8, 0.5),  # a few dozen images, for tests
    "small": Sizes(40, 12, 12, 3, 160, 40, 0.5),  # ~400 images, the demo's smoke scale
    "default": Sizes(1200, 300, 300, 3, 4000, 400, 0.5, 1),  # the demo: fine-grained; a tiny CLIP stays below 100
}


@dataclass(frozen=True)
class Group:
    count: int
    color: str
    shape: str
    size: str = ""  # fine scenes: 大 | 小
    where: str = ""  # fine scenes: a key of REGIONS

    def phrase(self) -> str:
        return f"{COUNTS[self.count]}{self.color}的{self.size}{self.shape}"


@dataclass(frozen=True)
class Scene:
    """A background and one or two groups of identical shapes (groups differ in colour and shape)."""

    bg: str
    groups: tuple[Group, ...]

    def query(self) -> str:
        if not self.groups[0].where:
            return f"{self.bg}背景上有" + "和".join(g.phrase() for g in self.groups)
        if len(self.groups) == 1:
            return f"{self.bg}背景的{self.groups[0].where}有{self.groups[0].phrase()}"
        return f"{self.bg}背景上，" + "，".join(f"{g.where}是{g.phrase()}" for g in self.groups)

    def matches(self, named: dict) -> bool:
        """Does this scene satisfy a (partial) description {"bg"?, "count"?, "color"?, "shape"?}?"""
        if "bg" in named and named["bg"] != self.bg:
            return False
        return any(all(getattr(g, k) == v for k, v in named.items() if k != "bg") for g in self.groups)


def random_scene(rng: random.Random, p_two: float, fine: bool = False) -> Scene:
    """``fine``: every group also has a size and a place; two groups sit in opposite halves."""
    bg = rng.choice(BACKGROUNDS)
    if rng.random() >= p_two:
        g = Group(rng.choice(list(COUNTS)), rng.choice(COLORS), rng.choice(SHAPES))
        return Scene(bg, (dataclasses.replace(g, size=rng.choice(SIZES), where=rng.choice(SIDES)) if fine else g,))
    if fine:
        pair = rng.choice(PAIRS)
        groups = [
            Group(rng.randint(1, 2), c, rng.choice(SHAPES), rng.choice(SIZES), w)
            for c, w in zip(rng.sample(COLORS, 2), pair)
        ]
        return Scene(bg, tuple(groups))
    (c1, c2), (s1, s2) = rng.sample(COLORS, 2), rng.sample(SHAPES, 2)
    groups = [Group(rng.randint(1, 2), c1, s1), Group(rng.randint(1, 2), c2, s2)]
    return Scene(bg, tuple(sorted(groups, key=lambda g: (SHAPES.index(g.shape), COLORS.index(g.color)))))


def _polar(r: float, a: float) -> tuple[float, float]:
    return r * math.cos(a), r * math.sin(a)


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "三角形":
        pts = [_polar(r, a) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "正方形":
        h = r * 0.78
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "五角星":
        pts = [_polar(r if i % 2 == 0 else r * 0.42, -math.pi / 2 + i * math.pi / 5) for i in range(10)]
    else:  # 十字形, point-symmetric
        w = r * 0.33
        half = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w)]
        pts = half + [(-x, -y) for x, y in half]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def draw_image(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw one RGB image of ``scene``: positions, sizes, rotations and colour jitter come from ``rng``."""
    S = size * 2  # supersampled for anti-aliased edges
    im = Image.new("RGB", (S, S), _jitter(RGB[scene.bg], rng, 8))
    draw = ImageDraw.Draw(im)
    n_total = sum(g.count for g in scene.groups)
    placed: list[tuple[float, float, float]] = []
    for g in scene.groups:
        color = _jitter(RGB[g.color], rng, 14)
        lo, hi = FINE_RADIUS[g.size] if g.size else _RADIUS[min(n_total, 5)]
        x0, x1, y0, y1 = (v * S for v in REGIONS.get(g.where, (0, 1, 0, 1)))
        for _ in range(g.count):
            for attempt in range(200):
                shrink = 1.0 - min(attempt, 150) / (300 if not g.size else 1000)  # crowded: make shapes smaller
                r = rng.uniform(lo, hi) * S * shrink
                cx, cy = rng.uniform(x0 + r + 1, x1 - r - 1), rng.uniform(y0 + r + 1, y1 - r - 1)
                if all(math.hypot(cx - x, cy - y) > r + rr + 0.04 * S for x, y, rr in placed):
                    break
            placed.append((cx, cy, r))
            if g.shape == "圆形":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
            else:
                angle = rng.uniform(-0.35, 0.35) if g.shape == "正方形" else rng.uniform(0, 2 * math.pi)
                draw.polygon(_shape_points(g.shape, cx, cy, r, angle), fill=color)
    return im.resize((size, size), Image.Resampling.LANCZOS)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    return _encode(im, "JPEG", quality=quality)


def messy_bytes(kind: str, im: Image.Image) -> bytes:
    """Encode ``im`` the way scraped data arrives; all kinds except truncated/html stay decodable."""
    if kind == "truncated":
        data = jpeg_bytes(im)
        return data[: len(data) // 2]
    if kind == "html":
        return (
            b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
            b"<body><h1>404 Not Found</h1></body></html>\n"
        )
    if kind == "png_rgba":
        rgba = im.convert("RGBA")
        rgba.putalpha(255)
        return _encode(rgba, "PNG")
    palette = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if kind == "gif_animated":  # the first frame is the real picture, then a black frame
        black = Image.new("RGB", im.size, (0, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
        return _encode(palette, "GIF", save_all=True, append_images=[black], duration=100, loop=0)
    return _encode(palette, {"gif": "GIF", "png_palette": "PNG"}[kind])


def _general_caption(scene: Scene, rng: random.Random) -> tuple[str, dict | None]:
    """A caption in the general family's style; returns (text, named attributes or None if complete)."""
    if rng.random() < 0.5:
        groups = "和".join(f"{g.where}{COUNTS[g.count]}{g.color}{g.size}{g.shape}" for g in scene.groups)
        return rng.choice(GENERAL_TEMPLATES).format(bg=scene.bg, groups=groups), None
    g = rng.choice(scene.groups)
    tpl = rng.choice(FINE_PARTIAL if g.where else GENERAL_PARTIAL)
    named = {"bg": scene.bg, "count": g.count, "color": g.color, "shape": g.shape, "size": g.size, "where": g.where}
    fields = {**named, "count": COUNTS[g.count]}
    return tpl.format(**fields), {k: v for k, v in named.items() if "{" + k + "}" in tpl}


class _Builder:
    def __init__(self, out: Path, size: int, seed: int, messy: bool, fine: bool = False):
        self.out, self.size, self.seed, self.messy, self.fine = out, size, seed, messy, fine
        self.mess_log: dict[str, list[dict]] = {}

    def rng(self, *key) -> random.Random:
        return random.Random(f"{self.seed}/" + "/".join(map(str, key)))

    def images(self, split: str, scenes: Sequence[Scene], mess_at: dict[int, str], shuffle: bool = False) -> list[int]:
        """Draw ``scenes`` into ``{split}_imgs.tsv``, image ``i`` made messy as ``mess_at[i]``; returns their ids."""
        base, rows = ID_BASES[split][0], []
        for i, scene in enumerate(scenes):
            im, kind = draw_image(scene, self.rng(split, "img", i), self.size), mess_at.get(i)
            if kind:
                self.mess_log.setdefault(split, []).append({"image_id": base + i, "kind": kind})
            rows.append((base + i, messy_bytes(kind, im) if kind else jpeg_bytes(im)))
        if shuffle:
            self.rng(split, "order").shuffle(rows)  # a query's images are not adjacent in the TSV
        with atomic_path(self.out / f"{split}_imgs.tsv") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{i}\t{base64.urlsafe_b64encode(data).decode('ascii')}\n" for i, data in rows)
        return [base + i for i in range(len(scenes))]

    def muge_split(self, split: str, queries: Sequence[Scene], per_query: int) -> dict:
        mess_at = {q * per_query: kind for q, kind in enumerate((MESS[split] if self.messy else ())[: len(queries)])}
        ids = self.images(split, [q for q in queries for _ in range(per_query)], mess_at, shuffle=True)
        base = ID_BASES[split][1]
        texts = [
            {"text_id": base + q, "text": s.query(), "image_ids": ids[q * per_query : (q + 1) * per_query]}
            for q, s in enumerate(queries)
        ]
        if split == "test":
            write_jsonl(self.out / "test_texts.jsonl", ({"text_id": t["text_id"], "text": t["text"]} for t in texts))
            write_jsonl(self.out / "test_answers.jsonl", texts)
        else:
            write_jsonl(self.out / f"{split}_texts.jsonl", texts)
        return {"queries": len(texts), "images": len(ids)}

    def general_split(self, split: str, n_images: int, p_two: float) -> dict:
        rng = self.rng(split, "scenes")
        scenes = [random_scene(rng, p_two, self.fine) for _ in range(n_images)]
        kinds = (MESS[split] if self.messy else ())[:n_images]
        step = max(1, n_images // max(1, len(kinds)))
        ids = self.images(split, scenes, {i * step: k for i, k in enumerate(kinds)})
        captions: dict[str, tuple[Scene, dict | None, list[int]]] = {}
        crng = self.rng(split, "captions")
        for image_id, scene in zip(ids, scenes):
            text, named = _general_caption(scene, crng)
            captions.setdefault(text, (scene, named, []))[2].append(image_id)
        texts = []
        for q, (text, (scene, named, own)) in enumerate(captions.items()):
            if split.endswith("valid"):  # gold: every image the caption describes, not just its own
                own = [i for i, s in zip(ids, scenes) if (s == scene if named is None else s.matches(named))]
            texts.append({"text_id": ID_BASES[split][1] + q, "text": text, "image_ids": own})
        write_jsonl(self.out / f"{split}_texts.jsonl", texts)
        return {"queries": len(texts), "images": len(ids)}


def _distinct_queries(n: int, rng: random.Random, p_two: float, fine: bool = False) -> list[Scene]:
    seen: dict[str, Scene] = {}
    for _ in range(200 * n + 1000):
        if len(seen) == n:
            break
        s = random_scene(rng, p_two, fine)
        seen.setdefault(s.query(), s)
    if len(seen) < n:
        raise SolutionError(f"could not draw {n} distinct queries (try a larger --two-group-fraction)")
    return list(seen.values())


def generate(
    out_dir, *, preset: str = "default", image_size: int = 64, seed: int = 0, messy: bool = True, **sizes
) -> dict:
    """Write the demo dataset under ``out_dir``; returns (and writes to ``demo_info.json``) its summary. ``sizes``:
    fields of :class:`Sizes` overriding the preset's (None: the preset's). The same arguments give the same bytes."""
    if preset not in PRESETS:
        raise SolutionError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    sz = dataclasses.replace(PRESETS[preset], **{k: v for k, v in sizes.items() if v is not None})
    counts = (sz.train_queries, sz.valid_queries, sz.test_queries, sz.general_train_images, sz.general_valid_images)
    if min(*counts, sz.images_per_query) < 1:
        raise SolutionError("every split needs at least one query (general: one image), each query one image")
    if max(counts) > 10_000:
        raise SolutionError("at most 10,000 queries (or general images) per split: each split has its own id range")
    if not 0.0 <= sz.two_group_fraction <= 1.0 or sz.fine not in (0, 1):
        raise SolutionError(
            f"two-group fraction must lie in [0, 1], fine be 0 or 1; got {sz.two_group_fraction}, {sz.fine}"
        )
    if image_size < 16:
        raise SolutionError(f"image size {image_size} is too small (at least 16 px)")
    out = Path(out_dir)
    (out / "general").mkdir(parents=True, exist_ok=True)
    b, n_test, n_valid = _Builder(out, image_size, seed, messy, bool(sz.fine)), sz.test_queries, sz.valid_queries
    pool = _distinct_queries(n_test + n_valid + sz.train_queries, b.rng("queries"), sz.two_group_fraction, b.fine)
    splits = {  # disjoint query sets: consecutive slices of one list of distinct queries
        "train": b.muge_split("train", pool[n_test + n_valid :], sz.images_per_query),
        "valid": b.muge_split("valid", pool[n_test : n_test + n_valid], sz.images_per_query),
        "test": b.muge_split("test", pool[:n_test], sz.images_per_query),
        "general/train": b.general_split("general/train", sz.general_train_images, sz.two_group_fraction),
        "general/valid": b.general_split("general/valid", sz.general_valid_images, sz.two_group_fraction),
    }
    info = {
        "out_dir": str(out),
        "seed": seed,
        "preset": preset,
        "image_size": image_size,
        "sizes": dataclasses.asdict(sz),
        "splits": splits,
        "messy": b.mess_log,
        "bad_image_ids": sorted(m["image_id"] for ms in b.mess_log.values() for m in ms if m["kind"] in BAD_KINDS),
    }
    write_json(out / "demo_info.json", info)
    return info

"""The failure browser (``python -m solution.inspect``): the page in a real headless Chromium, its size, its refusals."""

import base64
import io
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_error_line, snapshot
from PIL import Image

from solution.common import write_jsonl
from solution.data.lmdb_io import LMDBSplit, write_images
from solution.inspect import main

DRIVER = Path("/usr/bin/chromedriver")
RANKS = (0, 1, 4, 5, 9, None)  # where the first gold id goes: hits at 1/5/10, at 5/10, at 10 only, or none
MISSING_ID = 987654321  # not in any LMDB


def write_submission(path, gold, gallery, seed, missing=False):
    """Each query's first gold id at a random place of ``RANKS``, the other places random non-gold ids;
    ``missing``: the first query with a hit at 1 (not among the worst) ranks last an image id the LMDB lacks."""
    rng = random.Random(seed)
    preds = {}
    for q, g in gold.items():
        others = rng.sample([i for i in gallery if i not in g], 10)
        rank = rng.choice(RANKS)
        preds[q] = others if rank is None else others[:rank] + [g[0]] + others[rank:9]
    if missing:
        preds[next(q for q, ids in preds.items() if ids[0] in gold[q])][-1] = MISSING_ID
    path.write_text("".join(json.dumps({"text_id": q, "image_ids": ids}) + "\n" for q, ids in preds.items()))
    return preds


def oracle_values(preds, gold):
    """Per-query mean of hit@1/5/10 in float64 (exact: thirds compared with thirds)."""
    return {
        q: np.mean([any(i in g for i in preds[q][:k]) for k in (1, 5, 10)], dtype=np.float64) for q, g in gold.items()
    }


@pytest.fixture(scope="module")
def valid(world):
    """``(gold {text id: image ids}, texts path, imgs path, gallery ids, query texts)`` of the world's valid split."""
    texts = world.data / "valid_texts.jsonl"
    rows = [json.loads(line) for line in texts.read_text().splitlines()]
    imgs = world.lmdb("valid") / "imgs"
    gold = {r["text_id"]: r["image_ids"] for r in rows}
    return gold, texts, imgs, LMDBSplit(imgs, need_pairs=False).image_ids(), [r["text"] for r in rows]


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through its own chromedriver (nothing downloaded); skipped when not installed."""
    if not shutil.which("chromium") or not DRIVER.exists():
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    yield driver
    driver.quit()


def open_page(driver, html: Path):
    """Load the page, wait for its images; fail on any console error."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(html.as_uri())
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return [...document.images].every(i => i.complete)"))
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def shown(driver, selector=".q"):
    return driver.execute_script(f"return [...document.querySelectorAll('{selector}')].map(e => e.textContent)")


@pytest.mark.xdist_group("browser")
def test_page_and_its_comparison_in_chromium(valid, tmp_path, browser, caplog):
    from selenium.webdriver.support.ui import Select

    gold, texts, imgs, gallery, queries = valid
    data = ["--texts", str(texts), "--image-data", str(imgs)]
    preds = write_submission(tmp_path / "a.jsonl", gold, gallery, seed=0, missing=True)
    main(["--submission", str(tmp_path / "a.jsonl"), *data, "--output", str(tmp_path / "inspect" / "a.html")])
    assert "1 image ids are missing" in caplog.text
    open_page(browser, tmp_path / "inspect" / "a.html")
    first = "document.querySelector('.q .ranked')"
    widths = browser.execute_script(f"return [...{first}.querySelectorAll('img')].map(i => i.naturalWidth)")
    assert len(widths) == 10 and all(w > 0 for w in widths)
    means = [float(re.search(r"A mean ([\d.]+)", t).group(1)) for t in shown(browser)]
    assert len(means) == len(gold) and means == sorted(means)  # worst first
    assert shown(browser, ".ph") == [f"image {MISSING_ID} missing"]
    golds = browser.execute_script("return document.querySelectorAll('.ranked .gold').length")
    assert golds == sum(len(set(ids) & set(gold[q])) for q, ids in preds.items())
    word = next(w for w in ("五角星", "圆形", "三角形", "红色") if 0 < sum(w in t for t in queries) < len(queries))
    browser.find_element("id", "filter").send_keys(word)
    texts_shown = shown(browser, ".qtext")
    assert len(texts_shown) == sum(word in t for t in queries) and all(word in t for t in texts_shown)

    a = write_submission(tmp_path / "a.jsonl", gold, gallery, seed=1)  # --against B: what B fixed and broke
    b = write_submission(tmp_path / "b.jsonl", gold, gallery, seed=2)
    va, vb = oracle_values(a, gold), oracle_values(b, gold)
    fixed, broken = sum(vb[q] > va[q] for q in gold), sum(vb[q] < va[q] for q in gold)
    assert fixed and broken
    against = ["--submission", str(tmp_path / "a.jsonl"), "--against", str(tmp_path / "b.jsonl")]
    summary = main([*against, *data, "--output", str(tmp_path / "ab.html")])
    diff = 100 * np.mean([vb[q] - va[q] for q in gold], dtype=np.float64)
    assert summary["against"]["diff"] == pytest.approx(diff, abs=1e-9)  # B - A, not A - B
    open_page(browser, tmp_path / "ab.html")
    assert browser.find_element("id", "fixed").text == str(fixed)
    assert browser.find_element("id", "broken").text == str(broken)
    assert browser.execute_script("return document.querySelectorAll('.q')[0].querySelectorAll('.ranked').length") == 2
    Select(browser.find_element("id", "view")).select_by_value("1")
    assert len(shown(browser, ".q.fixed")) == len(shown(browser)) == fixed


def jpeg_b64(rng, size) -> bytes:
    im = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return base64.urlsafe_b64encode(buf.getvalue())


def test_size_each_image_once(tmp_path):
    """The page holds each id's thumbnail once (at most 96 px a side) plus a bounded amount per query, so MUGE's
    5,008 queries over 29,806 images make a file a browser opens. Texts without answers take them from --answers."""
    rng = np.random.default_rng(0)
    ids = list(range(1000, 1300))
    write_images(tmp_path / "lmdb", ((i, jpeg_b64(rng, (200, 150))) for i in ids))
    gold = {q: [ids[q % 300]] for q in range(120)}
    write_jsonl(tmp_path / "texts.jsonl", ({"text_id": q, "text": f"查询 {q}"} for q in gold))
    write_jsonl(tmp_path / "gold.jsonl", ({"text_id": q, "image_ids": g} for q, g in gold.items()))
    preds = write_submission(tmp_path / "a.jsonl", gold, ids, seed=3)
    out = tmp_path / "a.html"
    files = f"--submission {tmp_path}/a.jsonl --texts {tmp_path}/texts.jsonl --answers {tmp_path}/gold.jsonl"
    main([*files.split(), "--image-data", str(tmp_path / "lmdb"), "--output", str(out)])

    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', out.read_text())[1])
    used = {i for q in gold for i in preds[q] + gold[q]}
    assert {int(i) for i in data["images"]} == used
    thumbs = list(data["images"].values())
    assert {Image.open(io.BytesIO(base64.b64decode(t))).size for t in thumbs} == {(96, 72)}
    html = out.read_text()
    assert all(html.count(t) == 1 for t in thumbs)
    template = (Path(__file__).parents[1] / "solution" / "report" / "failures.html").stat().st_size
    assert len(html.encode()) < sum(map(len, thumbs)) + 400 * len(gold) + template


@pytest.mark.parametrize(
    "flag, name, message",  # the flag given a file of the test's folder
    [
        ("--submission", "nothing.jsonl", "submission file not found"),
        ("--submission", "other.jsonl", "text ids are not in the texts"),
        ("--submission", "nine.jsonl", "exactly 10 are required"),
        ("--texts", "test_texts.jsonl", "pass --answers"),  # texts without answers
        ("--image-data", "lmdb/valid/imgs", "not an LMDB split"),
        ("--output", "a.jsonl", "refusing to overwrite"),  # the submission
    ],
)
def test_refusals(valid, world, tmp_path, capsys, monkeypatch, flag, name, message):
    gold, texts, imgs, gallery, _ = valid
    preds = write_submission(tmp_path / "a.jsonl", gold, gallery, seed=0)
    q = next(iter(preds))
    extra = json.dumps({"text_id": 1, "image_ids": preds[q]}) + "\n"
    (tmp_path / "other.jsonl").write_text((tmp_path / "a.jsonl").read_text() + extra)
    (tmp_path / "nine.jsonl").write_text(json.dumps({"text_id": q, "image_ids": preds[q][:9]}) + "\n")
    shutil.copy(world.data / "test_texts.jsonl", tmp_path)
    out = tmp_path / "a.html"
    argv = {"--submission": tmp_path / "a.jsonl", "--texts": texts, "--image-data": imgs, "--output": out}
    argv[flag] = tmp_path / name
    before = snapshot(tmp_path)
    code, line = one_error_line(capsys, monkeypatch, main, [str(x) for kv in argv.items() for x in kv])
    assert code == 2 and message in line, line
    assert snapshot(tmp_path) == before and not out.exists()

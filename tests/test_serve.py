"""``retina-dist serve`` end to end: a real uvicorn server on localhost, driven by headless Chromium
(Debian's chromium + chromedriver through Selenium): upload, read the probabilities and the overlay
off the page, compare them with the predictor, and keep screenshots as test artefacts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, free_port, png_bomb
from tests.test_infer import images, trained  # noqa: F401  (module fixtures shared with predict)

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTEFACTS = Path(os.environ.get("RETINA_DIST_ARTEFACTS", REPO / "test-artefacts"))


@pytest.fixture(scope="module")
def server(trained):  # noqa: F811
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{port}.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "retina_dist",
            "serve",
            "--run",
            str(trained),
            "--port",
            str(port),
            "--max-upload-mb",
            "1",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "api/info", timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                raise AssertionError(f"server did not start:\n{Path(log.name).read_text()[-3000:]}") from None
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _post(url: str, field: str, name: str, data: bytes) -> tuple[int, dict]:
    boundary = "----retina-dist-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        url + "api/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_uploads_are_validated(server, images):  # noqa: F811
    from retina_dist.data.codec import encode

    png = sorted(images.glob("*.png"))[0].read_bytes()
    status, body = _post(server, "img", "a.png", png)
    assert status == 200 and abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["overlay"].startswith("data:image/png;base64,")
    cases = [
        ("img", "notes.txt", b"plain text, not an image", 415, "not a JPEG, PNG, TIFF or BMP"),
        ("img", "broken.png", png[:300], 422, "cannot be decoded"),
        ("img", "tiny.png", encode(np.zeros((16, 16, 3), np.uint8), ".png"), 422, "16 x 16 px"),
        ("img", "big.jpg", b"\xff\xd8\xff" + bytes(2 << 20), 413, "over the limit"),
        ("left", "a.png", png, 400, "no 'img' image"),
        ("img", "bomb.png", png_bomb(20000, 20000), 422, "decompression bomb"),
    ]
    for field, name, data, want, text in cases:
        status, body = _post(server, field, name, data)
        assert (status, text in body["error"]) == (want, True), (name, status, body)
    assert urllib.request.urlopen(server, timeout=5).status == 200  # still serving


def _server_rss(port: int) -> int:
    """Resident bytes of the process listening on ``port`` and its children."""
    import psutil

    pid = next(c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN")
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_serve_under_concurrent_load_answers_every_upload(server, images):  # noqa: F811
    """200 valid uploads from 16 concurrent clients, with oversized and malformed ones mixed in: every
    valid one answered with the probabilities a lone request gets, every bad one with its 4xx."""
    from concurrent.futures import ThreadPoolExecutor

    port = int(server.rstrip("/").rsplit(":", 1)[1])
    pngs = [p.read_bytes() for p in sorted(images.glob("*.png")) if p.name != "broken.png"]
    alone = [_post(server, "img", f"{i}.png", data)[1]["probabilities"] for i, data in enumerate(pngs)]
    jobs = [("ok", i % len(pngs)) for i in range(200)]
    jobs[::10] = [("big", 0)] * len(jobs[::10])  # 20 oversized
    jobs[5::10] = [("bad", 0)] * len(jobs[5::10])  # 20 malformed
    rss = [_server_rss(port)]

    def one(job: tuple[str, int]) -> tuple[str, int, int, dict, float]:
        kind, i = job
        data = {"ok": pngs[i], "big": b"\xff\xd8\xff" + bytes(2 << 20), "bad": pngs[i][:200]}[kind]
        t = time.perf_counter()
        status, body = _post(server, "img", f"upload {i} ü.png", data)
        return kind, i, status, body, time.perf_counter() - t

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, job) for job in jobs]
        while not all(f.done() for f in futures):
            rss.append(_server_rss(port))
            time.sleep(0.2)
    results = [f.result() for f in futures]
    latency = sorted(t for kind, _, _, _, t in results if kind == "ok")
    for kind, i, status, body, _ in results:
        if kind == "ok":
            assert status == 200, body
            got, want = body["probabilities"], alone[i]
            np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-6)
        else:
            assert status == {"big": 413, "bad": 422}[kind], (kind, status, body)
    assert sum(kind == "ok" for kind, *_ in results) == 160
    report = {
        "requests": len(results),
        "valid": len(latency),
        "p50_s": round(latency[len(latency) // 2], 3),
        "p95_s": round(latency[int(len(latency) * 0.95)], 3),
        "peak_rss_mib": round(max(rss) / 2**20, 1),
        "rss_before_mib": round(rss[0] / 2**20, 1),
    }
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "serve_load.json").write_text(json.dumps(report, indent=1))
    print("serve under load:", report)
    assert urllib.request.urlopen(server + "api/info", timeout=5).status == 200  # alive after


@pytest.mark.skipif(
    not (CHROMIUM and DRIVER) and not os.environ.get("RETINA_DIST_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (.ci/browser-up.sh installs them)",
)
def test_upload_in_headless_chromium_shows_probabilities_and_overlay(server, trained, images):  # noqa: F811
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from retina_dist.data.codec import decode
    from retina_dist.infer.predictor import Predictor

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or "/usr/bin/chromium"
    # Headless as root in a container, and no calls home (this machine's network refuses them).
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1100,1100",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER or "/usr/bin/chromedriver"), options=opts)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert "synthetic images" in driver.find_element(By.ID, "caveats").text
        image = sorted(images.glob("*.png"))[2]
        driver.find_element(By.ID, "file-img").send_keys(str(image))
        driver.find_element(By.ID, "submit").click()
        wait.until(ec.visibility_of_element_located((By.ID, "result")))
        overlay = driver.find_element(By.ID, "overlay")
        wait.until(
            lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay)
        )
        width = driver.execute_script("return arguments[0].naturalWidth", overlay)
        shown = {
            row.get_attribute("data-cls"): float(row.find_elements(By.TAG_NAME, "td")[1].text)
            for row in driver.find_elements(By.CSS_SELECTOR, "#probs tbody tr")
        }
        predicted = driver.find_element(By.ID, "predicted").text
        driver.save_screenshot(str(ARTEFACTS / "serve_result.png"))

        p = Predictor(trained, tta=False)
        res = p.results(p.prepare([decode(image.read_bytes())])[None])[0]
        assert list(shown) == list(p.task.classes)
        np.testing.assert_allclose(list(shown.values()), res.probs, atol=6e-5)  # shown to 4 decimals
        assert predicted == ", ".join(res.predicted)
        # image | overlay of the upload as the pack would store it (enlarged by whole pixels to at
        # least MIN_PANEL rows), then the colour bar: not the network's 48 px input
        from retina_dist.cam.render import MIN_PANEL
        from retina_dist.data.preprocess import as_packed

        h, w = as_packed(decode(image.read_bytes()), p.max_side).shape[:2]
        k = -(-MIN_PANEL // h)
        assert 2 * w * k < width < 2 * w * k + h * k // 4, (width, h, w, k)
        assert (
            p.cfg.cam.method == "ig"
            and "Integrated Gradients" in driver.find_element(By.ID, "overlay-caption").text
        )

        driver.find_element(By.ID, "file-img").send_keys(str(images / "notes.txt"))
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert "not a JPEG, PNG, TIFF or BMP image" in driver.find_element(By.ID, "error").text
        assert not driver.find_element(By.ID, "result").is_displayed()
        driver.save_screenshot(str(ARTEFACTS / "serve_bad_upload.png"))
    finally:
        driver.quit()
    print(f"screenshots: {ARTEFACTS / 'serve_result.png'}, {ARTEFACTS / 'serve_bad_upload.png'}")

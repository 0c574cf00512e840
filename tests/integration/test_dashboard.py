"""The dashboard in a real browser (Debian's headless chromium, driven by Selenium) against a
live network (ledger, projector, processors, a node runner): every page loads with no
console error, a task submitted during the test appears on the tasks page and reaches its
verdict there without a reload (server-sent events), and the server's Postgres
statements stay at one per tick however many pages are open. On the task's page the
result is decrypted in the browser from the account's keystore file and passphrase and
downloaded: the same bytes as ``Client.result``; a wrong passphrase is refused.
Screenshots are saved to ``$DESTRA_ARTIFACTS`` (else a directory under the test's
tmp_path), printed below."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from destra import keystore
from destra.client import Client
from destra.network import LocalNetwork
from destra.settings import Settings
from tests.support import free_port_block, running_network

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
NO_BROWSER = not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER))
PAGES = ["tasks", "operators", "network", "governance"]


@pytest.fixture
def live_net(network: Settings, kafka: str, pg_dsn: str,
             tmp_path: Path) -> Iterator[LocalNetwork]:
    with running_network(network.with_(home=tmp_path / "home"), kafka, pg_dsn, tmp_path, {
            "DESTRA_COMMIT_WINDOW_MS": "30000", "DESTRA_PRICE_INTERVAL_MS": "1000"}) as net:
        net.mint("alice")
        net.start_services()
        net.start_node("d0", region="eu-west", slots=2)
        net.start_node("d1", region="us-east", slots=2)
        net.wait_registered(["d0", "d1"])
        yield net


@pytest.fixture
def dashboard(live_net: LocalNetwork) -> Iterator[tuple[str, Any]]:
    """The dashboard app in this process (uvicorn in a thread) on a free port."""
    import uvicorn

    from destra.dashboard import pages
    from destra.dashboard.app import create_app
    from destra.dashboard.hub import Follower, Hub
    from destra.dashboard.sealed import SealedReader
    from destra.dashboard.services import Scraper

    net = live_net
    hub = Hub(net.pg_dsn, render=pages.render, follower=Follower(
        net.bootstrap, net.settings.topic_prefix, net.settings.genesis_path),
        scraper=Scraper(net.settings.home))
    port = free_port_block(1)
    sealed = SealedReader(net.bootstrap, net.settings.topic_prefix, net.settings.genesis_path,
                          net.settings.blobs)
    server = uvicorn.Server(uvicorn.Config(create_app(hub, sealed), host="127.0.0.1", port=port,
                                           log_level="warning", ws="none", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", hub
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    where = tmp_path / "downloads"
    where.mkdir()
    return where


@pytest.fixture
def browser(downloads: Path) -> Iterator[Any]:
    if NO_BROWSER:
        pytest.skip(f"no chromium at {CHROMIUM} or no chromedriver at {CHROMEDRIVER} "
                    "(apt-get install chromium chromium-driver; .ci/run does when root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingOptions", {"browser": "ALL"})
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {
        "behavior": "allow", "downloadPath": str(downloads), "eventsEnabled": False})
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    where = Path(os.environ.get("DESTRA_ARTIFACTS") or tmp_path / "artifacts") / "dashboard"
    where.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots in {where}")
    return where


def _errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _wait(check: Any, timeout_s: float, what: str, why: Any = None) -> Any:
    """``check()``'s first truthy value within ``timeout_s``. An element the live page
    replaced between finding it and reading it (``StaleElementReferenceException``: a
    row re-rendered by the event stream) is not there yet: look again."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}"
                                 + (f": {why()}" if why is not None else ""))
        time.sleep(0.2)


def test_every_page_loads_and_a_task_reaches_its_verdict_live(
        live_net: LocalNetwork, dashboard: tuple[str, Any], browser: Any,
        artifacts: Path, downloads: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, hub = dashboard
    driver = browser
    net = live_net

    driver.get(f"{url}/tasks")
    _wait(lambda: driver.find_element(By.ID, "live").text.startswith("live"), 20,
          "the event stream to open")
    # The submitter's watch grants each assigned node the task's data key (as `destra
    # submit --wait` does); it runs beside the browser until the verdict.
    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    watch = client.watch()
    task_id = client.submit(client.quote("matmul", {"n": "64", "seed": "7"},
                                         replicas=2, quorum=2))
    waiter = threading.Thread(target=client.wait, args=([task_id],),
                              kwargs={"watch": watch, "timeout_s": 240}, daemon=True)
    waiter.start()

    # The task appears and reaches its verdict on the open page, without a reload.
    marker = driver.execute_script("window.__same_page = 1; return window.__same_page;")
    assert marker == 1
    link = _wait(lambda: driver.find_elements(By.LINK_TEXT, task_id), 60,
                 f"{task_id} on the tasks page")[0]
    row = link.find_element(By.XPATH, "./ancestor::tr")
    _wait(lambda: "verified" in driver.find_element(By.LINK_TEXT, task_id)
          .find_element(By.XPATH, "./ancestor::tr").text, 180, f"{task_id} verified on the page",
          lambda: (driver.find_element(By.LINK_TEXT, task_id)
                   .find_element(By.XPATH, "./ancestor::tr").text,
                   hub.snapshot.tasks.get(task_id), hub.stats(),
                   {n: net.log(n)[-2000:] for n in net.procs}))
    assert driver.execute_script("return window.__same_page;") == 1, "the page was reloaded"
    updates = int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0)
    assert updates >= 2, f"only {updates} live updates arrived"
    assert row is not None
    waiter.join(30)
    watch.close()
    expected = client.result(task_id).output  # what `destra result` writes
    client.close()
    driver.save_screenshot(str(artifacts / "tasks.png"))
    assert not _errors(driver), _errors(driver)

    # Keyboard: the first Tab reaches the skip link, the next ones the page links.
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    assert driver.switch_to.active_element.text == "Skip to content"
    body.send_keys(Keys.TAB)
    assert driver.switch_to.active_element.tag_name == "a"

    # The task's page: its verdict, its replicas, the command that decrypts its result.
    driver.find_element(By.LINK_TEXT, task_id).click()
    _wait(lambda: "verified" in driver.find_element(By.ID, "task-facts").text, 20,
          "the task page")
    assert f"destra result {task_id} --account alice" in driver.find_element(
        By.ID, "result-command").text
    assert len(driver.find_elements(By.CSS_SELECTOR, "#task-replicas tbody tr")) >= 2
    assert not _errors(driver), _errors(driver)

    # Decrypt in the browser: the keystore file is read by the page, never uploaded. A
    # wrong passphrase is refused, saying so, and nothing is downloaded.
    section = driver.find_element(By.ID, "task-decrypt")
    assert section.is_displayed()
    keystore_file = keystore.account_path(net.settings, "alice")
    assert keystore_file.is_file()
    status = driver.find_element(By.ID, "decrypt-status")
    driver.find_element(By.ID, "decrypt-keystore").send_keys(str(keystore_file))
    driver.find_element(By.ID, "decrypt-passphrase").send_keys("not the passphrase")
    driver.find_element(By.ID, "decrypt-button").click()
    _wait(lambda: "Wrong passphrase" in status.text, 60, "the wrong passphrase refused",
          lambda: status.text)
    assert "error" in (status.get_attribute("class") or "")
    time.sleep(1)
    assert list(downloads.iterdir()) == [], list(downloads.iterdir())
    assert driver.find_element(By.ID, "decrypt-passphrase").get_attribute("value") == ""
    # The right one: the result opens, matches the verified digest and is downloaded,
    # byte for byte what the CLI's client decrypts.
    driver.find_element(By.ID, "decrypt-passphrase").send_keys(net.passphrase.decode())
    driver.find_element(By.ID, "decrypt-button").click()
    saved = _wait(lambda: [p for p in downloads.iterdir()
                           if not p.name.endswith(".crdownload")], 90, "the download",
                  lambda: (status.text, list(downloads.iterdir())))
    assert [p.name for p in saved] in ([f"{task_id}.json"], [f"{task_id}.out"]), saved
    _wait(lambda: saved[0].read_bytes() == expected, 10, "the whole download",
          lambda: (len(saved[0].read_bytes()), len(expected)))
    assert "is the verified digest" in status.text, status.text
    assert driver.find_element(By.ID, "decrypt-passphrase").get_attribute("value") == ""
    print(f"\nbrowser-decrypted {saved[0].name}: {len(expected)} bytes, equal to "
          "Client.result's output")
    driver.save_screenshot(str(artifacts / "task.png"))
    assert not _errors(driver), _errors(driver)

    for name in ("operators", "network", "governance"):
        driver.get(f"{url}/{name}")
        _wait(lambda: driver.find_element(By.ID, "live").text.startswith("live"), 20,
              f"the {name} page's stream")
        if name != "governance":
            _wait(lambda: driver.execute_script(
                "return document.querySelectorAll('.plot .main-svg').length"), 30,
                  f"the {name} page's plots")
        if name == "operators":
            assert "d0" in driver.find_element(By.ID, "nodes-table").text
            _wait(lambda: driver.execute_script(
                "return document.querySelectorAll('#plot-map .geo path').length > 0"), 30,
                  "the world map drawn from the local topojson")
            _wait(lambda: driver.execute_script(
                "return document.querySelectorAll('#plot-earnings .scatterlayer .trace')"
                ".length > 0"), 30, "the earnings plot")
        if name == "network":
            _wait(lambda: "verdicts in the last minute" in driver.find_element(
                By.ID, "network-summary").text, 10, "the network summary")
            # The services' own /metrics, scraped: every service and node is listed up,
            # and the ledger processor handled the task's events.
            services = _wait(lambda: (lambda t: t if "node-d1" in t else "")(
                driver.find_element(By.ID, "services-table").text), 20, "the services panel")
            for service in ("ledger-processor", "projector", "processors", "node-d0"):
                assert service in services, services
            assert "no:" not in services, services
            assert "treasury" in driver.find_element(By.ID, "network-summary").text
        time.sleep(1.5)  # let the plots settle (and any late error surface)
        driver.save_screenshot(str(artifacts / f"{name}.png"))
        assert not _errors(driver), (name, _errors(driver))

    # A phone's width: nothing wider than the screen but the tables' own scroll areas.
    driver.set_window_size(375, 800)
    for name in PAGES:
        driver.get(f"{url}/{name}")
        time.sleep(0.5)
        width = driver.execute_script("return document.documentElement.scrollWidth")
        inner = driver.execute_script("return window.innerWidth")
        assert width <= inner + 1, f"{name} is {width}px wide on a {inner}px screen"
    driver.get(f"{url}/tasks")
    driver.save_screenshot(str(artifacts / "tasks-375.png"))
    assert not _errors(driver), _errors(driver)

    # Five open pages (a browser keeps at most six connections to one server, so five
    # streams here; bench/dashboard.py measures twenty): still at most one statement a tick.
    driver.set_window_size(1280, 1000)
    for i in range(4):
        driver.switch_to.new_window("tab")
        driver.get(f"{url}/{PAGES[i]}")
    time.sleep(2)
    before, t0 = hub.queries, time.monotonic()
    time.sleep(5)
    rate = (hub.queries - before) / (time.monotonic() - t0)
    assert rate <= 1.0 / hub.tick_s + 0.25, rate
    assert hub.stats()["streams"] >= 5
    assert not _errors(driver), _errors(driver)
    stats = hub.stats()
    assert stats["queries"] <= stats["uptime_s"] / hub.tick_s + 2, stats

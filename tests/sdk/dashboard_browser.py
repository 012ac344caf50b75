"""Drives the dashboard of a running `flex up --demo` in a real headless Chromium (Selenium with
Debian's chromium and chromium-driver), and calls the proxy with the official `openai` SDK.

Usage: python dashboard_browser.py DATA_DIR SCREENSHOT_DIR
Prints one JSON line at the end ({"org_id", "key_id", ...}) for the Rust test to check with
`flex admin`. On failure it saves a screenshot of the failing page and of every page it visited (taken
when it was visited) into SCREENSHOT_DIR, and exits non-zero. With FLEX_DASHBOARD_SCREENSHOTS=1 it saves them on
success too (the screenshot in README.md and docs/dashboard.md comes from there).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import openai
from openai import OpenAI
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

DATA_DIR, SHOTS = sys.argv[1], sys.argv[2]
demo = json.load(open(os.path.join(DATA_DIR, "demo.json")))
sim_keys = json.load(open(os.path.join(DATA_DIR, "sim-keys.json")))
DASH = demo["dashboard_url"]
API = demo["base_url"]
PASSWORD = "correct horse battery staple"
shots = []  # (name, PNG) of every page as it was seen, written out on failure


def launch():
    profile = tempfile.mkdtemp(prefix="flex-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("FLEX_TEST_CHROMIUM", "/usr/bin/chromium")
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ]:
        opts.add_argument(flag)
    service = Service(executable_path=os.environ.get("FLEX_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(30)
    return driver, profile


driver, profile = launch()


def page(name, url=None):
    """Opens `url` (or stays), records it for the screenshots, checks what every page must be."""
    if url is not None:
        driver.get(url)
    shots.append((name, driver.get_screenshot_as_png()))
    check_accessible(name)
    return driver.page_source


def check_accessible(name):
    """Every visible form control has a label; there is one h1; the skip link is the first stop."""
    unlabeled = driver.execute_script(
        """return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
             .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
             .map(e => e.outerHTML)"""
    )
    assert not unlabeled, f"{name}: controls without a label: {unlabeled}"
    assert len(driver.find_elements(By.TAG_NAME, "h1")) == 1, f"{name}: one h1"
    assert not driver.find_elements(By.CSS_SELECTOR, "[style]"), f"{name}: inline style (the CSP forbids it)"


def h1():
    return driver.find_element(By.TAG_NAME, "h1").text


def mark_document():
    driver.execute_script("window.__flexOld = true;")


def wait_new_document(what, within=15):
    """Waits until the page marked by mark_document() has been replaced and has loaded."""
    deadline = time.monotonic() + within
    while True:
        try:
            done = driver.execute_script("return !window.__flexOld && document.readyState === 'complete'")
        except Exception:  # the page is being replaced
            done = False
        if done:
            return
        assert time.monotonic() < deadline, f"{what}: no new page within {within} s"
        time.sleep(0.05)


def submit(form_selector):
    mark_document()
    driver.find_element(By.CSS_SELECTOR, f"{form_selector} button[type=submit]").click()
    wait_new_document(f"submitting {form_selector}")


def org_url(path):
    m = re.search(r"/orgs/(org_[0-9a-f]+)", driver.current_url)
    assert m, driver.current_url
    return f"{DASH}/orgs/{m.group(1)}/{path}", m.group(1)


def sign_up(email):
    page("sign-in", DASH + "/")
    assert "/signin" in driver.current_url, driver.current_url
    mark_document()
    driver.find_element(By.LINK_TEXT, "Create one").click()
    wait_new_document("the sign-up link")
    page("sign-up")
    driver.find_element(By.ID, "email").send_keys(email)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    submit("form[action='/signup']")
    assert driver.current_url.endswith("/quickstart"), driver.current_url
    page("quickstart")
    assert h1() == "Quickstart"
    return org_url("")[1]


def forged_post(action, fields, with_csrf=True):
    """Submits a form the page did not have (as a crafted request would): the CSP does not
    apply to WebDriver's script, the server's checks do."""
    mark_document()
    driver.execute_script(
        """const [action, fields, withCsrf] = arguments;
           const f = document.createElement('form');
           f.method = 'post'; f.action = action;
           const csrf = document.querySelector('input[name=csrf]');
           const all = Object.assign({}, fields);
           if (withCsrf && csrf) all.csrf = csrf.value;
           for (const [k, v] of Object.entries(all)) {
             const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i);
           }
           document.body.appendChild(f); f.submit();""",
        action,
        fields,
        with_csrf,
    )
    wait_new_document(f"posting to {action}")
    return driver.page_source


def save_screenshots(final):
    os.makedirs(SHOTS, exist_ok=True)
    try:
        driver.save_screenshot(os.path.join(SHOTS, f"00-{final}.png"))
    except Exception as e:  # a screenshot must not hide the failure
        print(f"screenshot of the last page failed: {e}", file=sys.stderr)
    for i, (name, png) in enumerate(shots, 1):
        with open(os.path.join(SHOTS, f"{i:02d}-{name}.png"), "wb") as f:
            f.write(png)


def run():
    # 1. Sign up: the account is its own org.
    org_id = sign_up("ada@example.com")

    # 2. Before any provider key, the proxy's error names the dashboard page that fixes it.
    mark_document()
    driver.find_element(By.LINK_TEXT, "API keys").click()
    wait_new_document("the API keys link")
    page("keys")
    assert "No keys yet" in driver.page_source
    driver.find_element(By.ID, "key-name").send_keys("sdk")
    submit("form[action$='/keys']")
    page("key-created")
    secret = driver.find_element(By.ID, "new-secret").get_attribute("value")
    assert secret.startswith("flex_live_"), secret
    assert "only time it is shown" in driver.page_source
    copy = driver.find_element(By.CSS_SELECTOR, "button.copy")
    assert copy.is_displayed(), "the copy button appears with JavaScript"
    copy.click()
    time.sleep(0.2)
    assert copy.text in ("Copied", "Press Ctrl+C"), copy.text
    mark_document()
    driver.refresh()
    wait_new_document("reloading")
    page("keys-reloaded")
    assert not driver.find_elements(By.ID, "new-secret"), "a reload shows the key again"
    assert secret not in driver.page_source
    row = driver.find_element(By.XPATH, "//tr[td[1][normalize-space()='sdk']]")
    assert "active" in row.text and "never" in row.text, row.text
    key_hint = row.find_element(By.TAG_NAME, "code").text
    assert secret.endswith(key_hint[-4:]), (key_hint, secret[-4:])

    client = OpenAI(base_url=API, api_key=secret, max_retries=0)
    try:
        client.responses.create(model="gpt-5.5", input="Hi", extra_body={"start_within": "00h-00m-10s"})
        raise AssertionError("no_byok_key expected")
    except openai.BadRequestError as e:
        assert e.code == "no_byok_key", e
        assert f"{DASH}/provider-keys" in str(e), str(e)
    # The link works: after signing in it lands on this org's provider keys.
    page("provider-keys", f"{DASH}/provider-keys")
    assert driver.current_url == org_url("provider-keys")[0], driver.current_url

    # 3. Paste the provider key: only its last four characters come back.
    openai_key = sim_keys["openai"]
    driver.find_element(By.ID, "secret-openai").send_keys(openai_key)
    submit("form[action$='/provider-keys/openai']")
    page("provider-key-saved")
    assert f"…{openai_key[-4:]}" in driver.page_source, driver.page_source
    assert openai_key not in driver.page_source
    assert "Saved the OpenAI key" in driver.find_element(By.CSS_SELECTOR, ".notice").text

    # 4. The official SDK through the proxy with the new key: flex serves (the demo simulator's
    #    flex tier starts after 1.5 s, inside the 10 s budget).
    resp = client.responses.create(model="gpt-5.5", input="Hello!", extra_body={"start_within": "00h-00m-10s"})
    assert resp.service_tier == "flex", resp.service_tier
    assert resp.output_text, resp

    # 5. The request is on the usage page with its served tier and its savings.
    usage_url = org_url("usage")[0]
    deadline = time.monotonic() + 15
    while True:
        page("usage", usage_url)
        # The refused request (no_byok_key, 400) is in the ledger too; the answered one is 200.
        rows = [
            [c.text for c in r.find_elements(By.TAG_NAME, "td")]
            for r in driver.find_elements(By.CSS_SELECTOR, "#recent tbody tr")
        ]
        answered = [c for c in rows if c[4].startswith("200")]
        if answered or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(answered) == 1, driver.page_source
    assert any(c[4].startswith("400") for c in rows), rows
    cells = answered[0]
    assert cells[1] == "gpt-5.5" and cells[2] == "flex", cells
    assert cells[3] == "flex_started", cells
    saved = cells[8]
    assert saved.startswith("$") and float(saved.strip("$").replace(",", "")) > 0, cells
    assert cells[9] == "sdk", cells
    stats = driver.find_element(By.CSS_SELECTOR, ".stats").text
    assert "50% on flex" in stats, stats
    assert driver.find_element(By.CSS_SELECTOR, "svg.chart rect.saved"), "the chart shows the saving"
    by_tier = driver.find_element(By.XPATH, "//section[h2='By served tier']").text
    assert "flex" in by_tier, by_tier
    csv_link = driver.find_element(By.LINK_TEXT, "Download CSV").get_attribute("href")
    assert "/usage.csv?days=30" in csv_link, csv_link
    page("keys-after-use", org_url("keys")[0])
    row = driver.find_element(By.XPATH, "//tr[td[1][normalize-space()='sdk']]")
    assert "never" not in row.text, "last used comes from the ledger: " + row.text
    for name in ["billing", "quickstart", "members", "audit"]:
        page(name, org_url(name)[0])
    assert "ada@example.com" in driver.find_element(By.TAG_NAME, "table").text, "the audit names the user"
    page("quickstart", org_url("quickstart")[0])
    assert API in driver.find_element(By.ID, "base-url").get_attribute("value")

    # The quickstart's snippets work as shown, with the key in FLEX_API_KEY (the other two
    # providers' keys pasted first; the flexinference SDK from this repository's sdk/python;
    # only the Node.js one is not run: no node here).
    for provider in ["anthropic", "gemini"]:
        page("provider-keys", org_url("provider-keys")[0])
        driver.find_element(By.ID, f"secret-{provider}").send_keys(sim_keys[provider])
        submit(f"form[action$='/provider-keys/{provider}']")
    page("quickstart", org_url("quickstart")[0])
    snippets = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".snippets pre code")]
    assert len(snippets) == 6, snippets
    sdk_src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python", "src")
    env = dict(os.environ, FLEX_API_KEY=secret, PYTHONPATH=os.path.abspath(sdk_src))
    ran = 0
    for code in snippets:
        if code.startswith("curl "):
            cmd = ["bash", "-c", code]
        elif code.startswith("import os\n"):
            cmd = [sys.executable, "-c", code]
        else:
            continue  # Node.js
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (code, out.stdout, out.stderr)
        assert "flex" in out.stdout or "default" in out.stdout or "standard" in out.stdout, (code, out.stdout)
        ran += 1
    assert ran == 5, ran

    # 6. Keyboard: the first Tab stop is the skip link.
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert driver.switch_to.active_element.get_attribute("class") == "skip"

    # 7. On a phone: no page scrolls sideways, the nav is there.
    driver.set_window_size(390, 844)
    for name in ["keys", "provider-keys", "usage", "billing", "quickstart", "members", "audit"]:
        page(f"phone-{name}", org_url(name)[0])
        wide = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 1, f"{name} is {wide}px too wide on a phone"
        assert driver.find_element(By.CSS_SELECTOR, "nav.side").is_displayed()
    driver.set_window_size(1280, 900)

    # 8. Revoke with its confirmation; the proxy refuses the key within a second.
    page("keys", org_url("keys")[0])
    row = driver.find_element(By.XPATH, "//tr[td[1][normalize-space()='sdk']]")
    mark_document()
    row.find_element(By.PARTIAL_LINK_TEXT, "Revoke").click()
    wait_new_document("the revoke link")
    page("revoke-confirm")
    assert "Revoke the API key “sdk”?" in h1(), h1()
    revoke_url = driver.current_url
    key_id = re.search(r"/keys/(key_[0-9a-f]+)/revoke", revoke_url).group(1)
    driver.find_element(By.ID, "reason").send_keys("browser test")
    submit("main form")
    revoked_at = time.monotonic()
    page("revoked")
    assert "Revoked the API key" in driver.find_element(By.CSS_SELECTOR, ".notice").text
    while True:
        try:
            client.responses.create(model="gpt-5.5", input="Hi", extra_body={"start_within": "default"})
        except openai.AuthenticationError as e:
            assert e.status_code == 401
            break
        assert time.monotonic() - revoked_at < 1.0, "the revoked key still worked after a second"
        time.sleep(0.05)
    refused_after = time.monotonic() - revoked_at
    assert refused_after < 1.0, refused_after

    # 9. A second account cannot see or touch the first one's keys, by URL or by form.
    submit("form[action='/signout']")
    assert "/signin" in driver.current_url
    driver.delete_all_cookies()
    other_org = sign_up("bob@example.com")
    assert other_org != org_id
    for path in ["keys", "provider-keys", "usage", "usage.csv", "billing", "members", "audit", f"keys/{key_id}/revoke"]:
        page(f"forbidden-{path.split('/')[0]}", f"{DASH}/orgs/{org_id}/{path}")
        assert h1() == "Not found", (path, h1())
        assert "sdk" not in driver.find_element(By.TAG_NAME, "main").text
    page("own-keys", f"{DASH}/orgs/{other_org}/keys")
    assert "ada@example.com" not in driver.page_source and org_id not in driver.page_source
    for action, fields in [
        (f"/orgs/{org_id}/keys/{key_id}/revoke", {}),
        (f"/orgs/{other_org}/keys/{key_id}/revoke", {}),
        (f"/orgs/{org_id}/keys", {"name": "sneaky"}),
        (f"/orgs/{org_id}/provider-keys/openai/remove", {}),
    ]:
        page("own-keys", f"{DASH}/orgs/{other_org}/keys")
        forged_post(action, fields)
        assert h1() == "Not found", (action, h1())

    # 10. A form posted without its CSRF token is refused, and changes nothing.
    page("own-keys", f"{DASH}/orgs/{other_org}/keys")
    forged_post(f"/orgs/{other_org}/keys", {"name": "no-csrf"}, with_csrf=False)
    assert h1() == "Refused", h1()
    assert "reload the page" in driver.page_source
    page("own-keys", f"{DASH}/orgs/{other_org}/keys")
    assert "no-csrf" not in driver.page_source

    # 11. The demo's own sign-in from demo.json.
    submit("form[action='/signout']")
    page("sign-in")
    driver.find_element(By.ID, "email").send_keys(demo["dashboard_email"])
    driver.find_element(By.ID, "password").send_keys(demo["dashboard_password"])
    submit("form[action='/signin']")
    page("demo-quickstart")
    assert org_url("")[1] == demo["org_id"], driver.current_url

    return {"org_id": org_id, "key_id": key_id, "other_org_id": other_org, "refused_after_s": refused_after}


try:
    result = run()
    if os.environ.get("FLEX_DASHBOARD_SCREENSHOTS") == "1":
        save_screenshots("done")
    print(json.dumps(result))
except Exception:
    traceback.print_exc()
    print(f"current page: {driver.current_url}", file=sys.stderr)
    save_screenshots("failure")
    print(f"screenshots of every page visited are in {SHOTS}", file=sys.stderr)
    sys.exit(1)
finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)

"""Browser flows of the Gatehouse console, driven in a real headless Chromium (Debian's
`chromium` and `chromium-driver`) through Selenium. Run by tests/it/console.rs, which
starts the gateway, makes the admin tokens and checks the store, the upstream and the
audit log afterwards; this script does what a person does in the browser and prints one
JSON object with what it saw.

    flows.py CASE --admin URL [--proxy URL] [--token TOKEN] [--screenshots DIR]
"""

import argparse
import http.server
import json
import os
import sys
import threading
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("GATEHOUSE_CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    # Console errors (a CSP violation, a script error) are read back at the end.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = os.environ.get("GATEHOUSE_CHROMEDRIVER", "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(20)
    return driver


def no_alert(driver):
    try:
        text = driver.switch_to.alert.text
        return "alert opened: " + text
    except NoAlertPresentException:
        return None


def navigating(driver, action):
    """Runs `action` (a click or a submit) and waits until the page it leads to replaced
    this one: reading the new page before that reads the old one."""
    page = driver.find_element(By.TAG_NAME, "html")
    action()
    WebDriverWait(driver, 20).until(lambda _: replaced(page))


def replaced(element):
    """Whether `element`'s page is gone. Mid-navigation chromedriver may answer "Node with
    given id does not belong to the document" instead of a stale-element error (seen in
    CI): that is gone too."""
    try:
        element.is_enabled()
        return False
    except StaleElementReferenceException:
        return True
    except WebDriverException as e:
        if "does not belong to the document" in str(e):
            return True
        raise


def submit(driver, element):
    navigating(driver, element.submit)


def click(driver, element):
    navigating(driver, element.click)


def run_script(driver, script):
    navigating(driver, lambda: driver.execute_script(script))


def sign_in(driver, admin, token):
    driver.get(admin + "/ui/sign-in")
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    submit(driver, field)
    return driver.find_element(By.TAG_NAME, "h1").text


def proxy_status(proxy, token):
    req = urllib.request.Request(proxy + "/api/console-check", headers={"X-API-Key": token})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status
    except urllib.error.HTTPError as e:
        return e.code


def shot(driver, dirname, name):
    if dirname:
        driver.save_screenshot(os.path.join(dirname, name))


def operator_flow(driver, a, out):
    """Create a user, add a key, use it, revoke it: acceptance 1."""
    out["signed_in_as"] = sign_in(driver, a.admin, a.token)
    out["whoami"] = driver.find_element(By.ID, "whoami").text
    driver.get(a.admin + "/ui/users")
    click(driver, driver.find_element(By.ID, "new-user"))
    driver.find_element(By.ID, "id").send_keys("console-made")
    driver.find_element(By.ID, "display_name").send_keys("Made in the console")
    driver.find_element(By.ID, "description").send_keys("ERP sync, created by the browser test")
    driver.find_element(By.ID, "role-all").click()
    submit(driver, driver.find_element(By.ID, "user-form"))
    out["after_create"] = driver.find_element(By.TAG_NAME, "h1").text
    driver.find_element(By.ID, "label").send_keys("first")
    submit(driver, driver.find_element(By.ID, "add-key"))
    token = driver.find_element(By.ID, "secret").text
    out["token_prefix"] = token[:4]
    out["example_has_token"] = token in driver.find_element(By.ID, "example").text
    out["copy_button_visible"] = driver.find_element(By.CSS_SELECTOR, "button[data-copy=secret]").is_displayed()
    shot(driver, a.screenshots, "console-key-shown.png")
    # A reload shows nothing: the token was shown once (the form's POST redirected here,
    # so nothing is posted again either).
    driver.refresh()
    out["after_reload"] = driver.find_element(By.TAG_NAME, "main").text
    out["status_with_key"] = proxy_status(a.proxy, token)
    driver.get(a.admin + "/ui/users/console-made")
    click(driver, driver.find_element(By.LINK_TEXT, "Revoke"))
    out["consequence"] = driver.find_element(By.ID, "consequence").text
    click(driver, driver.find_element(By.ID, "confirm"))
    out["after_revoke"] = driver.find_element(By.TAG_NAME, "h1").text
    out["key_status"] = driver.find_element(By.CSS_SELECTOR, "#keys tbody tr td:nth-child(4)").text
    out["key_24h"] = driver.find_element(By.CSS_SELECTOR, "#keys tbody tr td:nth-child(8)").text
    out["per_day"] = [[td.get_attribute("textContent") for td in tr.find_elements(By.TAG_NAME, "td")]
                      for tr in driver.find_elements(By.CSS_SELECTOR, "#per-day tbody tr")]
    out["status_after_revoke"] = proxy_status(a.proxy, token)
    driver.get(a.admin + "/ui/users")
    shot(driver, a.screenshots, "console-users.png")
    driver.set_window_size(390, 844)
    driver.get(a.admin + "/ui/users")
    shot(driver, a.screenshots, "console-users-phone.png")
    out["phone_table_scrolls"] = driver.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1")


def lifecycle_flow(driver, a, out):
    """Rotate with a grace period, edit with a refused value, disable and enable."""
    sign_in(driver, a.admin, a.token)
    driver.get(a.admin + "/ui/users/svc")
    click(driver, driver.find_element(By.LINK_TEXT, "Rotate"))
    out["rotate_consequence"] = driver.find_element(By.ID, "consequence").text
    submit(driver, driver.find_element(By.ID, "rotate"))
    new_token = driver.find_element(By.ID, "secret").text
    out["replaces"] = driver.find_element(By.ID, "replaces").text
    out["new_token_status"] = proxy_status(a.proxy, new_token)
    driver.get(a.admin + "/ui/users/svc")
    out["key_states"] = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#keys tbody tr td:nth-child(4)")]
    # Edit: an invalid rule comes back with the API's reason and what was typed.
    driver.get(a.admin + "/ui/users/svc/edit")
    endpoints = driver.find_element(By.ID, "allowed_endpoints")
    endpoints.clear()
    endpoints.send_keys("GET nowhere")
    description = driver.find_element(By.ID, "description")
    description.clear()
    description.send_keys("edited in the console")
    submit(driver, driver.find_element(By.ID, "user-form"))
    out["edit_error"] = driver.find_element(By.ID, "form-error").text
    out["kept_typed"] = driver.find_element(By.ID, "allowed_endpoints").get_attribute("value")
    endpoints = driver.find_element(By.ID, "allowed_endpoints")
    endpoints.clear()
    endpoints.send_keys("GET /api/**")
    submit(driver, driver.find_element(By.ID, "user-form"))
    out["after_edit"] = driver.find_element(By.ID, "description").text
    # Disable (the confirmation says what happens), then enable.
    click(driver, driver.find_element(By.LINK_TEXT, "Disable"))
    out["disable_consequence"] = driver.find_element(By.ID, "consequence").text
    click(driver, driver.find_element(By.ID, "confirm"))
    out["disabled_status"] = proxy_status(a.proxy, new_token)
    click(driver, driver.find_element(By.LINK_TEXT, "Enable"))
    click(driver, driver.find_element(By.ID, "confirm"))
    out["enabled_status"] = proxy_status(a.proxy, new_token)


def roles_flow(driver, a, out):
    """An admin creates a role (a bad rule first), and deletes it."""
    sign_in(driver, a.admin, a.token)
    driver.get(a.admin + "/ui/roles")
    driver.find_element(By.ID, "new-name").send_keys("reader")
    driver.find_element(By.ID, "new-rules").send_keys("GET /api/**\nGET x")
    submit(driver, driver.find_element(By.ID, "new-role"))
    out["role_error"] = driver.find_element(By.ID, "form-error").text
    rules = driver.find_element(By.ID, "new-rules")
    rules.clear()
    rules.send_keys("GET /api/**")
    submit(driver, driver.find_element(By.ID, "new-role"))
    out["roles_after_create"] = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "main h2")]
    click(driver, driver.find_element(By.XPATH, "//button[normalize-space()='Delete role reader']"))
    out["roles_after_delete"] = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "main h2")]


def viewer_flow(driver, a, out):
    """A viewer sees no write control, and a write with its session is 403: acceptance 2."""
    sign_in(driver, a.admin, a.token)
    forms = []
    for page in ("/ui/", "/ui/users", "/ui/users/svc", "/ui/roles", "/ui/audit"):
        driver.get(a.admin + page)
        posts = [f.get_attribute("action") for f in driver.find_elements(By.CSS_SELECTOR, "form[method=post]")]
        forms += [p for p in posts if not p.endswith("/ui/sign-out")]
        for text in ("New user", "Revoke", "Edit", "Disable", "Retire", "Add key", "Save role"):
            if driver.find_elements(By.XPATH, "//*[self::a or self::button][normalize-space()='%s']" % text):
                forms.append(page + ": " + text)
    out["write_controls"] = forms
    driver.get(a.admin + "/ui/new-user")
    out["new_user_page"] = driver.find_element(By.TAG_NAME, "main").text
    # A write sent with the viewer's own session and CSRF token, from a form the test
    # puts into the console's page (same origin, right token): the server refuses it.
    driver.get(a.admin + "/ui/users/svc")
    run_script(driver, """
        const csrf = document.querySelector('input[name=csrf]').value;
        const f = document.createElement('form');
        f.method = 'post'; f.action = '/ui/users/svc/keys';
        const i = document.createElement('input'); i.name = 'csrf'; i.value = csrf; f.appendChild(i);
        const l = document.createElement('input'); l.name = 'label'; l.value = 'by-viewer'; f.appendChild(l);
        document.body.appendChild(f); f.submit();
    """)
    out["forged_write"] = driver.find_element(By.TAG_NAME, "main").text


def csrf_flow(driver, a, out):
    """A form without the CSRF token, and one from another origin, change nothing."""
    sign_in(driver, a.admin, a.token)
    driver.get(a.admin + "/ui/users/svc")
    run_script(driver, """
        const f = document.createElement('form');
        f.method = 'post'; f.action = '/ui/users/svc/status/disable';
        document.body.appendChild(f); f.submit();
    """)
    out["without_csrf"] = driver.find_element(By.TAG_NAME, "main").text
    # The attacker's page (another origin: `localhost`, not 127.0.0.1) posts to the
    # console with a made-up token.
    page = ('<!DOCTYPE html><title>attack</title><form method="post" action="%s/ui/users/svc/status/disable">'
            '<input type="hidden" name="csrf" value="forged"><button id="go">go</button></form>' % a.admin)

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver.get("http://localhost:%d/attack.html" % server.server_address[1])
    click(driver, driver.find_element(By.ID, "go"))
    out["other_origin"] = driver.find_element(By.TAG_NAME, "body").text
    out["alert"] = no_alert(driver)
    server.shutdown()


def xss_flow(driver, a, out):
    """User-supplied values are text on every page; nothing runs."""
    sign_in(driver, a.admin, a.token)
    seen = {}
    for page in ("/ui/users", "/ui/users/xss-user", "/ui/audit", "/ui/"):
        driver.get(a.admin + page)
        seen[page] = {
            "alert": no_alert(driver),
            "scripts": [s.get_attribute("src") for s in driver.find_elements(By.TAG_NAME, "script")],
            "injected_img": len(driver.find_elements(By.CSS_SELECTOR, "img[src=x], img[src$='/x']")),
            "ran": driver.execute_script("return window.xssRan === 1"),
            "text": driver.find_element(By.TAG_NAME, "main").text,
        }
    out["pages"] = seen


def overview_flow(driver, a, out):
    """The overview's numbers as the page shows them: acceptance 4."""
    sign_in(driver, a.admin, a.token)
    driver.get(a.admin + "/ui/")
    out["requests"] = driver.find_element(By.ID, "requests-hour").text
    out["failures"] = driver.find_element(By.ID, "failures-hour").text
    rows = driver.find_elements(By.CSS_SELECTOR, "#failures tbody tr")
    out["by_reason"] = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
                        for r in rows}
    out["keyless"] = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#keyless li")]
    out["old"] = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")[:2]]
                  for tr in driver.find_elements(By.CSS_SELECTOR, "#old tbody tr")]


def sign_in_flow(driver, a, out):
    """Wrong tokens: the sign-in page with a message and no session; then slowed down."""
    messages = []
    for i in range(6):
        sign_in(driver, a.admin, "gha_wrong%d" % i)
        messages.append(driver.find_element(By.ID, "sign-in-error").text)
    out["messages"] = messages
    out["cookies"] = [c["name"] for c in driver.get_cookies()]
    driver.get(a.admin + "/ui/users")
    out["users_page_without_session"] = driver.current_url


def sign_out_flow(driver, a, out):
    """Keyboard only: sign in (the token field has the focus), reach the users page by
    Tab and Enter, then sign out; the session is gone."""
    driver.get(a.admin + "/ui/sign-in")
    out["focused"] = driver.switch_to.active_element.get_attribute("id")
    navigating(driver, lambda: driver.switch_to.active_element.send_keys(a.token, Keys.ENTER))
    out["signed_in_as"] = driver.find_element(By.TAG_NAME, "h1").text
    # Tab from the top of the page to the "Users" link (the second link of the navigation).
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    for _ in range(5):
        if driver.switch_to.active_element.text == "Users":
            break
        driver.switch_to.active_element.send_keys(Keys.TAB)
    out["tabbed_to"] = driver.switch_to.active_element.text
    navigating(driver, lambda: driver.switch_to.active_element.send_keys(Keys.ENTER))
    out["after_enter"] = driver.find_element(By.TAG_NAME, "h1").text
    cookie = driver.get_cookie("gatehouse_console")
    out["cookie"] = {k: cookie.get(k) for k in ("httpOnly", "sameSite", "path", "secure")}
    click(driver, driver.find_element(By.XPATH, "//button[normalize-space()='Sign out']"))
    driver.get(a.admin + "/ui/users")
    out["after_sign_out"] = driver.current_url


FLOWS = {
    "operator": operator_flow,
    "lifecycle": lifecycle_flow,
    "roles": roles_flow,
    "viewer": viewer_flow,
    "csrf": csrf_flow,
    "xss": xss_flow,
    "overview": overview_flow,
    "sign-in": sign_in_flow,
    "sign-out": sign_out_flow,
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=sorted(FLOWS))
    p.add_argument("--admin", required=True)
    p.add_argument("--proxy", default="")
    p.add_argument("--token", default="")
    p.add_argument("--screenshots", default="")
    a = p.parse_args()
    driver = browser()
    out = {}
    try:
        FLOWS[a.case](driver, a, out)
        # Script errors and Content-Security-Policy violations; not the "Failed to load
        # resource" of a 4xx page, whose status the flows check themselves.
        out["console_errors"] = [e["message"] for e in driver.get_log("browser")
                                 if e["level"] == "SEVERE" and "the server responded with a status of" not in e["message"]]
    finally:
        driver.quit()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

"""Drives the node's operator dashboard (GET /dashboard) in a real browser.

Run by the e2e tests: python3 dashboard_browser.py BASE_URL ADMIN_TOKEN, against a node that
has `hello` deployed twice (revisions 1 and 2, all traffic on latest) and requested, and
`worker` (misbehave) with one dead-letter job and a `/log?text=dashboard-line` request.
Uses playwright (PyPI) with Debian's chromium at /usr/bin/chromium, headless.

Prints one JSON object with what it saw and exits 0; on a failed expectation prints what it
saw (stdout: JSON with "ok": false; stderr: the same, readable), saves a screenshot to $TMPDIR
and exits 1.
"""
import json
import os
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 15_000


class Failure(Exception):
    pass


def main():
    if len(sys.argv) != 3:
        print("usage: dashboard_browser.py BASE_URL ADMIN_TOKEN", file=sys.stderr)
        return 2
    base, token = sys.argv[1].rstrip("/"), sys.argv[2]
    started = time.monotonic()
    seen = {"steps": []}
    console_errors = []  # (phase, text)
    page_errors = []
    dialogs = []
    phase = {"now": "load"}

    def step(name, **facts):
        seen["steps"].append(name)
        seen.update(facts)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
        # CSP violations are reported to the page as events; keep them where the test can read them.
        context.add_init_script(
            """
            window.__cspViolations = [];
            document.addEventListener('securitypolicyviolation', (e) => {
              window.__cspViolations.push({directive: e.violatedDirective, blocked: e.blockedURI,
                                           source: e.sourceFile, line: e.lineNumber, sample: e.sample});
            });
            """
        )
        page = context.new_page()
        page.on("console", lambda m: console_errors.append((phase["now"], m.text)) if m.type == "error" else None)
        page.on("pageerror", lambda e: page_errors.append(str(e)))

        def on_dialog(dialog):
            dialogs.append({"type": dialog.type, "message": dialog.message})
            dialog.accept()

        page.on("dialog", on_dialog)

        def wait_js(expression, what, arg=None):
            try:
                return page.wait_for_function(expression, arg=arg, timeout=WAIT_MS, polling=100).json_value()
            except Exception as e:  # a timeout: say what was expected
                raise Failure(f"timed out waiting for {what}") from e

        def text(selector):
            loc = page.locator(selector)
            return loc.first.inner_text() if loc.count() else None

        def visible(selector):
            return page.locator(selector).first.is_visible()

        try:
            # 1. The login form; a wrong token is refused; the right one signs in.
            response = page.goto(f"{base}/dashboard", wait_until="load")
            if response is None or response.status != 200:
                raise Failure(f"GET /dashboard answered {response and response.status}")
            seen["csp_header"] = response.headers.get("content-security-policy")
            page.locator("#login-form").wait_for(state="visible", timeout=WAIT_MS)
            if visible("#dashboard"):
                raise Failure("the dashboard shows before signing in")

            phase["now"] = "wrong-token"
            page.fill("#token", "not-the-admin-token")
            page.click("#login-form button[type=submit]")
            wait_js(
                "() => { const m = document.getElementById('login-message');"
                " return !m.hidden && /refused|401/.test(m.textContent) && !m.textContent.startsWith('Checking'); }",
                "the wrong token's error message",
            )
            seen["wrong_token_message"] = text("#login-message")
            if not visible("#login-form") or visible("#dashboard"):
                raise Failure("a wrong token left the login form")
            step("wrong token refused")

            phase["now"] = "signed-in"
            page.fill("#token", token)
            page.click("#login-form button[type=submit]")
            page.locator("#dashboard").wait_for(state="visible", timeout=WAIT_MS)
            if visible("#login-form"):
                raise Failure("the login form still shows after signing in")
            stored = page.evaluate("() => sessionStorage.getItem('tensorlet.adminToken')")
            if stored != token:
                raise Failure("the token is not kept in sessionStorage")
            step("signed in")

            # 2. Node status, apps with revisions and traffic, jobs, models, logs.
            wait_js(
                "() => { const d = document.querySelector('#status [data-field=version] dd');"
                " return d && d.textContent.trim() !== '' && d.textContent !== '—'; }",
                "the node's version",
            )
            seen["status"] = text("#status")
            wait_js(
                "() => !!document.querySelector('#apps [data-app=\"hello\"] [data-revision=\"1\"]')"
                " && !!document.querySelector('#apps [data-app=\"hello\"] [data-revision=\"2\"]')"
                " && !!document.querySelector('#apps [data-app=\"worker\"]')",
                "apps hello (revisions 1 and 2) and worker",
            )
            hello_traffic = page.eval_on_selector_all(
                '#apps [data-app="hello"] [data-traffic-revision]',
                "els => els.map(e => ({revision: e.dataset.trafficRevision,"
                " resolved: e.dataset.resolvedRevision, percent: e.dataset.percent, text: e.textContent}))",
            )
            seen["hello_traffic_before"] = hello_traffic
            if not (
                len(hello_traffic) == 1
                and hello_traffic[0]["revision"] == "latest"
                and hello_traffic[0]["resolved"] == "2"
                and hello_traffic[0]["percent"] == "100"
            ):
                raise Failure("hello's traffic is not 100% latest (revision 2)")
            if page.locator('[data-rollback="hello"]').count() != 1:
                raise Failure("no Roll back button for hello")
            step("apps")

            dead = wait_js(
                "() => { const c = document.querySelector('#jobs [data-jobs-app=\"worker\"] [data-field=dead]');"
                " return c && c.textContent.trim() === '1' ? c.textContent : false; }",
                "1 dead job for worker",
            )
            seen["worker_dead_jobs"] = int(dead)
            page.select_option("#dead-letters-app", "worker")
            wait_js(
                "() => document.querySelectorAll('#dead-letters[data-app=\"worker\"] [data-dead-letter]').length === 1",
                "worker's dead letter",
            )
            seen["dead_letter"] = text("#dead-letters [data-dead-letter]")
            step("jobs")

            wait_js(
                "() => document.getElementById('models').childElementCount > 0",
                "the models section",
            )
            seen["models"] = text("#models")
            step("models")

            # A hostile log line must show as text, not become markup.
            probe = '<img src=x id=xss-probe onerror="window.__xss=1">dashboard-xss'
            logged = page.evaluate(
                "async (t) => { const r = await fetch('/apps/worker/log?text=' + encodeURIComponent(t),"
                " {cache: 'no-store'}); await r.text(); return r.status; }",
                probe,
            )
            if logged != 200:
                raise Failure(f"GET /apps/worker/log answered {logged}")
            page.select_option("#logs-app", "worker")
            wait_js(
                "(probe) => { const l = document.getElementById('logs');"
                " const cells = [...l.querySelectorAll('[data-field=message]')];"
                " return l.dataset.app === 'worker' && cells.some(td => td.textContent.includes('dashboard-line'))"
                " && cells.some(td => td.textContent.includes(probe)); }",
                "worker's log lines dashboard-line and the hostile one, as text",
                arg=probe,
            )
            seen["log_lines"] = page.locator("#logs tbody tr").count()
            if page.locator("#logs img, #xss-probe").count() or page.evaluate("() => window.__xss") is not None:
                raise Failure("a log line became markup")
            step("logs")

            # 3. Requests to hello show as a rate (computed by the page from two scrapes).
            rate = None
            deadline = time.monotonic() + 20
            sent = 0
            while time.monotonic() < deadline:
                statuses = page.evaluate(
                    "async () => { const out = []; for (let i = 0; i < 5; i++) {"
                    " const r = await fetch('/apps/hello/', {cache: 'no-store'}); await r.text(); out.push(r.status); }"
                    " return out; }"
                )
                sent += len(statuses)
                if any(s != 200 for s in statuses):
                    raise Failure(f"requests to hello answered {statuses}")
                page.wait_for_timeout(400)
                value = page.get_attribute('#rates [data-rate-app="hello"]', "data-rate")
                if value:
                    try:
                        if float(value) > 0:
                            rate = float(value)
                            break
                    except ValueError:
                        pass
            seen["hello_requests_sent"] = sent
            seen["hello_rate_shown"] = text('#rates [data-rate-app="hello"]')
            if rate is None:
                raise Failure("no requests/s figure above 0 for hello")
            seen["hello_req_per_s"] = rate
            step("rates")

            # 4. Roll back hello: confirm, POST, refresh; traffic is then revision 1 at 100%.
            phase["now"] = "rollback"
            page.click('[data-rollback="hello"]')
            wait_js(
                "() => { const t = [...document.querySelectorAll('#apps [data-app=\"hello\"] [data-traffic-revision]')];"
                " return t.length === 1 && t[0].dataset.trafficRevision === '1' && t[0].dataset.percent === '100'; }",
                "hello's traffic to show revision 1 at 100%",
            )
            if not dialogs or dialogs[-1]["type"] != "confirm" or "hello" not in dialogs[-1]["message"]:
                raise Failure(f"no confirm() naming hello before the rollback: {dialogs}")
            seen["hello_traffic_after"] = text('#apps [data-app="hello"] [data-traffic]')
            seen["action_result"] = text("#action-result-text")
            api = page.evaluate(
                "async (token) => { const r = await fetch('/v1/admin/apps/hello',"
                " {headers: {Authorization: 'Bearer ' + token}, cache: 'no-store'});"
                " return {status: r.status, body: await r.json()}; }",
                token,
            )
            record = (api.get("body") or {}).get("app", {}).get("record") or (api.get("body") or {}).get("record")
            if record is None:
                # GET /v1/admin/apps/{name} may answer the app itself; look through the list.
                apps = page.evaluate(
                    "async (token) => (await (await fetch('/v1/admin/apps',"
                    " {headers: {Authorization: 'Bearer ' + token}, cache: 'no-store'})).json())",
                    token,
                )
                record = next(a["record"] for a in apps["apps"] if a["name"] == "hello")
            seen["api_traffic_after"] = record.get("traffic")
            traffic = record.get("traffic") or []
            if not (len(traffic) == 1 and traffic[0].get("revision") == 1 and traffic[0].get("percent") == 100):
                raise Failure("the API does not show hello's traffic on revision 1")
            step("rollback")

            # Log out: back to the form, the token forgotten.
            phase["now"] = "logout"
            page.click("#logout")
            page.locator("#login-form").wait_for(state="visible", timeout=WAIT_MS)
            if page.evaluate("() => sessionStorage.getItem('tensorlet.adminToken')") is not None:
                raise Failure("logging out kept the token")
            if page.locator("#apps [data-app]").count():
                raise Failure("logging out left the apps on the page")
            step("logout")

            # 5. No console errors (but the wrong token's 401), no page errors, no CSP violations.
            page.wait_for_timeout(300)
            csp = page.evaluate("() => window.__cspViolations")
            seen["csp_violations"] = csp
            unexpected = [
                (ph, t) for ph, t in console_errors
                if not (ph == "wrong-token" and "401" in t)
            ]
            seen["console_errors"] = [t for _, t in unexpected]
            seen["page_errors"] = page_errors
            if csp:
                raise Failure("CSP violations")
            if unexpected:
                raise Failure("console errors")
            if page_errors:
                raise Failure("uncaught page errors")

            seen["seconds"] = round(time.monotonic() - started, 1)
            print(json.dumps({"ok": True, **seen}, default=str))
            return 0
        except Exception as e:  # noqa: BLE001 — report whatever went wrong with what was seen
            seen["failure"] = f"{type(e).__name__}: {e}"
            try:
                seen["error_banner"] = text("#error")
                seen["login_message"] = text("#login-message")
                seen["csp_violations"] = page.evaluate("() => window.__cspViolations")
                seen["page_text"] = page.inner_text("body")[:4000]
            except Exception as inner:  # noqa: BLE001
                seen["page_unreadable"] = str(inner)
            seen["console_errors"] = [f"[{ph}] {t}" for ph, t in console_errors]
            seen["page_errors"] = page_errors
            seen["dialogs"] = dialogs
            shot = os.path.join(os.environ.get("TMPDIR") or tempfile.gettempdir(),
                                f"dashboard-failure-{os.getpid()}.png")
            try:
                page.screenshot(path=shot, full_page=True)
                seen["screenshot"] = shot
            except Exception as inner:  # noqa: BLE001
                seen["screenshot_failed"] = str(inner)
            seen["seconds"] = round(time.monotonic() - started, 1)
            report = json.dumps({"ok": False, **seen}, default=str)
            print(report)
            print(f"dashboard browser test failed: {seen['failure']}\n{json.dumps(seen, indent=2, default=str)}",
                  file=sys.stderr)
            return 1
        finally:
            context.close()
            browser.close()


if __name__ == "__main__":
    sys.exit(main())

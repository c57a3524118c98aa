// Drives the login viewer (/login-session) in headless Chromium as the user: signs in (the
// account API, as the account page does), starts a login session, connects to the sandboxed browser over WebRTC, and
// operates the fake provider's sign-in page through the data channels only: the e-mail typed
// key by key, Tab, the password by a clipboard paste, then a mouse click on "Sign in" (the fake
// site puts it at x 40–280, y 420–476). Waits until the session is completed and prints JSON:
// the ping/pong round trips, the frames drawn and when.
//   node login-viewer.mjs <base-url> <email> <password> <provider> <site-email> <site-password>
// With MODE=connect it stops once frames are drawn and prints the session id (for tests that
// then break the agent).
import { chromium } from "playwright-core";

const [base, email, password, provider, siteEmail, sitePassword] = process.argv.slice(2);
const mode = process.env.MODE ?? "full";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  // Host candidates as plain addresses (no mDNS names), so the agent can reach them.
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-features=WebRtcHideLocalIpsWithMdns"],
});
const out = { pageErrors: [], console: [] };
const stats = (page) => page.evaluate(() => JSON.parse(JSON.stringify(window.polydevLogin)));
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1100 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => out.pageErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") out.console.push(m.text()); });

  // Signed out, the viewer sends the user to the account page; sign in there the way its form
  // does (the account page itself has its own browser test).
  await page.goto(`${base}/login-session`);
  await page.waitForSelector("#signed-out:not([hidden])");
  const signedIn = await page.evaluate(async ([email, password]) => {
    const { csrf_token } = await (await fetch("/v1/account/session")).json();
    const response = await fetch("/v1/account/signin", {
      method: "POST",
      headers: { "content-type": "application/json", "x-csrf-token": csrf_token },
      body: JSON.stringify({ email, password }),
    });
    return response.status;
  }, [email, password]);
  if (signedIn !== 200) throw new Error(`sign-in: ${signedIn}`);
  await page.reload();
  await page.waitForSelector("#start-form:not([hidden])");
  await page.selectOption("#provider", provider);
  await page.click("#start");
  await page.waitForFunction(() => window.polydevLogin.connected && window.polydevLogin.frames > 0, null, { timeout: 90000 });
  out.session = new URL(page.url()).searchParams.get("session");
  if (mode === "connect") {
    out.stats = await stats(page);
    await page.waitForFunction(() => ["failed", "completed"].includes(window.polydevLogin.status), null, { timeout: 120000 });
    out.final = await stats(page);
    out.stateText = await page.textContent("#session-state");
  } else {
    // The sign-in page has loaded once a few frames are in (its e-mail field has autofocus);
    // meanwhile the control channel's pings (every 250 ms) measure the round trip.
    await page.waitForTimeout(3000);
    const startedAt = await page.evaluate(() => performance.now());
    const canvas = page.locator("#screen");
    await canvas.focus();
    await page.keyboard.type(siteEmail, { delay: 30 });
    await page.keyboard.press("Tab");
    // A clipboard paste onto the canvas, as Ctrl+V from a password manager gives it.
    await canvas.evaluate((el, text) => {
      const data = new DataTransfer();
      data.setData("text/plain", text);
      el.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
    }, sitePassword);
    await page.waitForTimeout(500);
    if (process.env.SCREENSHOT_DIR) await page.screenshot({ path: `${process.env.SCREENSHOT_DIR}/login-viewer.png` });
    // Click "Sign in" (CSS px 160, 448 of the remote page) through the scaled canvas.
    const box = await canvas.boundingBox();
    const size = await canvas.evaluate((el) => [el.width, el.height]);
    await page.mouse.click(box.x + (160 * box.width) / size[0], box.y + (448 * box.height) / size[1]);
    await page.waitForFunction(() => ["completed", "failed"].includes(window.polydevLogin.status), null, { timeout: 90000 });
    const endedAt = await page.evaluate(() => performance.now());
    out.stats = await stats(page);
    out.window = { startedAt, endedAt };
    out.stateText = await page.textContent("#session-state");
  }
} catch (e) {
  out.error = String(e?.stack ?? e);
  for (const page of browser.contexts().flatMap((c) => c.pages())) {
    out.pageText = await page.evaluate(() => [location.href, document.getElementById("status")?.textContent,
      document.getElementById("error")?.textContent]).catch(() => null);
    // What the page knew when it gave up (the session's status and error, the connection's
    // state, round trips and frames), and the words it showed for the session.
    out.stats = await stats(page).catch(() => null);
    out.stateText = await page.evaluate(() => document.getElementById("session-state")?.textContent).catch(() => null);
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));

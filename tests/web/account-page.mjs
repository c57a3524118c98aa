// Drives the account page in headless Chromium (Debian's, via playwright-core) with a virtual
// authenticator (DevTools WebAuthn domain): password sign-in with the keyboard only → usage,
// tokens (create), passkey (register) → sign out → sign in with the passkey → phone width.
// Writes a screenshot of each view to $SCREENSHOT_DIR and prints a JSON summary.
//   node account-page.mjs <base-url> <email> <password> [<oauth-authorize-url>]
// With an authorization URL, it also opens the OAuth consent page signed in and allows it.
import { chromium } from "playwright-core";

const [base, email, password, authorizeUrl] = process.argv.slice(2);
const dir = process.env.SCREENSHOT_DIR ?? "/tmp";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = { pageErrors: [], shots: [] };
const shot = async (page, name) => {
  const path = `${dir}/account-${name}.png`;
  await page.screenshot({ path, fullPage: true });
  out.shots.push(path);
};
try {
  const context = await browser.newContext({ viewport: { width: 1000, height: 900 } });
  let page = await context.newPage();
  page.on("pageerror", (e) => out.pageErrors.push(String(e)));
  const cdp = await context.newCDPSession(page);
  await cdp.send("WebAuthn.enable");
  const { authenticatorId } = await cdp.send("WebAuthn.addVirtualAuthenticator", {
    options: { protocol: "ctap2", transport: "internal", hasResidentKey: true, hasUserVerification: true,
               isUserVerified: true, automaticPresenceSimulation: true },
  });

  await page.goto(`${base}/account`);
  await page.waitForSelector("#signed-out:not([hidden])");
  await shot(page, "signed-out");
  // Keyboard only: Tab to the e-mail field, type, Tab, type, Enter.
  for (let i = 0; i < 20; i++) {
    if (await page.evaluate(() => document.activeElement?.id) === "signin-email") break;
    await page.keyboard.press("Tab");
  }
  out.focusReachedEmail = await page.evaluate(() => document.activeElement?.id) === "signin-email";
  await page.keyboard.type(email);
  await page.keyboard.press("Tab");
  await page.keyboard.type(password);
  await page.keyboard.press("Enter");
  await page.waitForSelector("#signed-in:not([hidden])");
  out.whoami = await page.textContent("#whoami");
  out.quotaRows = await page.$$eval("#quota-table tbody tr", (rows) => rows.length);
  out.modelRows = await page.$$eval("#model-table tbody tr td:first-child", (cells) => cells.map((c) => c.textContent));
  out.firstBar = await page.$eval("#usage-chart rect.bar title", (t) => t.textContent.split(": ")[1].split(" ")[0]);
  await shot(page, "signed-in");

  await page.fill("#token-name", "laptop");
  await page.selectOption("#token-scope", "mcp");
  await page.click("#token-form button[type=submit]");
  await page.waitForSelector("#new-token:not([hidden])");
  out.newToken = await page.textContent("#new-token-value");
  out.tokenRows = await page.$$eval("#token-table tbody tr", (rows) => rows.map((r) => r.textContent));
  await page.locator("#tokens").screenshot({ path: `${dir}/account-tokens.png` });
  out.shots.push(`${dir}/account-tokens.png`);

  await page.fill("#passkey-name", "virtual key");
  await page.click("#passkey-add");
  await page.waitForFunction(() => document.querySelector("#passkey-list").textContent.includes("virtual key"), null, { timeout: 30000 });
  out.credentials = (await cdp.send("WebAuthn.getCredentials", { authenticatorId })).credentials.length;
  await page.locator("#passkeys").screenshot({ path: `${dir}/account-passkeys.png` });
  out.shots.push(`${dir}/account-passkeys.png`);

  await page.click("#signout");
  await page.waitForSelector("#signed-out:not([hidden])");
  await page.click("#passkey-signin");
  await page.waitForSelector("#signed-in:not([hidden])", { timeout: 30000 });
  out.statusAfterPasskey = await page.textContent("#status");
  out.whoamiAfterPasskey = await page.textContent("#whoami");

  if (authorizeUrl) {
    // The consent page in a real browser: CSP allows the redirect back to the app after Allow.
    await page.goto(authorizeUrl);
    await page.waitForSelector("#approve");
    out.consentClient = await page.textContent("#client-name");
    await shot(page, "consent");
    const redirected = page.waitForRequest((r) => r.url().startsWith("http://127.0.0.1:45678/cb"), { timeout: 30000 });
    await page.click("#approve");
    const callback = new URL((await redirected).url());
    out.consentCode = callback.searchParams.has("code");
    out.consentIss = callback.searchParams.get("iss");
    // (The app's loopback listener does not exist: that tab ends on an error page.)
    const again = await context.newPage();
    await again.goto(`${base}/account`);
    await again.waitForSelector("#signed-in:not([hidden])");
    out.grants = await again.$$eval("#grant-list li", (items) => items.map((i) => i.textContent));
    await page.close();
    page = again;
  }

  await page.setViewportSize({ width: 390, height: 844 });
  out.phoneOverflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  await shot(page, "phone");
} catch (error) {
  out.failure = String(error?.stack ?? error);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));

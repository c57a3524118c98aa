// Drives the admin console in headless Chromium (Debian's, via playwright-core): a non-admin
// sees "not an administrator"; an admin signs in, finds a user, sees their zero-knowledge status
// (never content), changes their plan and sees the audit row; the usage chart and catalogue.
// Writes screenshots to $SCREENSHOT_DIR and prints a JSON summary.
//   node admin-page.mjs <base-url> <admin-email> <password> <user-email> <non-admin-email>
import { chromium } from "playwright-core";

const [base, adminEmail, password, userEmail, plainEmail] = process.argv.slice(2);
const dir = process.env.SCREENSHOT_DIR ?? "/tmp";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = { pageErrors: [], consoleErrors: [], shots: [] };
const shot = async (target, name) => {
  const path = `${dir}/admin-${name}.png`;
  await target.screenshot(target.url ? { path, fullPage: true } : { path });
  out.shots.push(path);
};
async function signIn(page, email) {
  await page.goto(`${base}/admin`);
  await page.waitForSelector("#signed-out:not([hidden])");
  await page.fill("#signin-email", email);
  await page.fill("#signin-password", password);
  await page.click("#signin-form button[type=submit]");
}
try {
  // A signed-in user who is not an admin.
  const plain = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  let page = await plain.newPage();
  page.on("pageerror", (e) => out.pageErrors.push(String(e)));
  await signIn(page, plainEmail);
  await page.waitForSelector("#not-admin:not([hidden])");
  out.plainConsoleHidden = await page.$eval("#console", (c) => c.hidden);
  await plain.close();

  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  page = await context.newPage();
  page.on("pageerror", (e) => out.pageErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") out.consoleErrors.push(m.text()); });
  await signIn(page, adminEmail);
  await page.waitForSelector("#console:not([hidden])");
  out.whoami = await page.textContent("#whoami");
  out.userRows = await page.$$eval("#user-table tbody tr", (rows) => rows.length);
  out.chartBars = await page.$$eval("#admin-chart rect.bar", (bars) => bars.filter((b) => Number(b.getAttribute("height")) > 0).length);
  out.errorBars = await page.$$eval("#admin-chart rect.err", (bars) => bars.length);
  out.providers = await page.$$eval("#provider-table tbody tr", (rows) => rows.map((r) => r.textContent));
  await shot(page, "console");

  await page.fill("#search", userEmail);
  await page.click("#search-form button[type=submit]");
  await page.waitForFunction(() => document.querySelectorAll("#user-table tbody tr").length === 1);
  await page.click("#user-table tbody tr button");
  await page.waitForSelector("#user-detail:not([hidden])");
  out.zkNote = await page.textContent("#detail-zk");
  out.planBefore = await page.$eval("#plan-select", (s) => s.value);
  await page.selectOption("#plan-select", "pro");
  await page.click("#plan-form button[type=submit]");
  await page.waitForFunction(() => document.getElementById("status").textContent === "Plan changed to pro.");
  await page.waitForFunction(() => document.querySelector("#audit-table tbody tr td:nth-child(3)")?.textContent === "user.plan");
  out.detailMeta = await page.textContent("#detail-meta");
  out.detailAudit = await page.$$eval("#detail-audit li", (items) => items.map((i) => i.textContent));
  out.auditFirst = await page.$$eval("#audit-table tbody tr:first-child td", (cells) => cells.map((c) => c.textContent));
  await page.locator("#user-detail").screenshot({ path: `${dir}/admin-user.png` });
  out.shots.push(`${dir}/admin-user.png`);
  await page.locator("#usage").screenshot({ path: `${dir}/admin-usage.png` });
  out.shots.push(`${dir}/admin-usage.png`);
  await page.locator("#audit").screenshot({ path: `${dir}/admin-audit.png` });
  out.shots.push(`${dir}/admin-audit.png`);

  out.consoleErrorsBeforeBadInput = [...out.consoleErrors];
  // A refused change says why and changes nothing: an unknown plan typed into the API.
  out.badPlan = await page.evaluate(async (id) => {
    const session = await (await fetch("/v1/account/session")).json();
    const r = await fetch(`/v1/admin/users/${id}/plan`, {
      method: "PUT", headers: { "content-type": "application/json", "x-csrf-token": session.csrf_token },
      body: JSON.stringify({ plan: "platinum" }) });
    return { status: r.status, body: await r.json() };
  }, await page.evaluate(() => document.getElementById("detail-meta").textContent.split(" ")[1]));
} catch (e) {
  out.failure = String(e?.stack ?? e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));

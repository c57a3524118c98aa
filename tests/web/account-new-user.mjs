// Signs a user who has made no model call yet in to the account page (headless Chromium, via
// playwright-core) and prints a JSON summary: the page's script errors and the model table.
//   node account-new-user.mjs <base-url> <email> <password>
import { chromium } from "playwright-core";

const [base, email, password] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = { pageErrors: [] };
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => out.pageErrors.push(String(e)));
  await page.goto(`${base}/account`);
  await page.waitForSelector("#signed-out:not([hidden])");
  await page.fill("#signin-email", email);
  await page.fill("#signin-password", password);
  await page.press("#signin-password", "Enter");
  await page.waitForSelector("#signed-in:not([hidden])");
  // The usage tables are filled after sign-in; wait for the model table's one row.
  await page.waitForSelector("#model-table tbody tr", { timeout: 10000 }).catch(() => {});
  out.modelRows = await page.$$eval("#model-table tbody tr", (rows) => rows.map((r) => r.textContent));
} catch (e) {
  out.failure = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));

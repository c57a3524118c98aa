// Drives the zero-knowledge page in headless Chromium (Debian's, via playwright-core):
// sign in → set the master password → read the recovery key → migrate → reload → unlock →
// the history reads correctly. Prints a JSON summary; the Rust test checks the database.
//   node zk-page.mjs <base-url> <email:account-password> <password> <expected-messages-json>
import { chromium } from "playwright-core";

const [base, account, password, expectedJson] = process.argv.slice(2);
const [email, accountPassword] = [account.slice(0, account.indexOf(":")), account.slice(account.indexOf(":") + 1)];
const expected = JSON.parse(expectedJson);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = {};
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base);
  await page.waitForSelector("#signin:not([hidden])");
  await page.fill("#email", email);
  await page.fill("#account-password", accountPassword);
  await page.click("#signin-button");
  await page.waitForSelector("#setup:not([hidden])");
  await page.fill("#new-password", "short");
  out.weakHint = await page.textContent("#strength");
  await page.fill("#new-password", password);
  out.strongHint = await page.textContent("#strength");
  await page.fill("#new-password-again", password);
  await page.check("#understood");
  await page.click("#setup-button");
  await page.waitForSelector("#recovery:not([hidden])", { timeout: 60000 });
  out.recoveryKey = (await page.textContent("#recovery-key")).trim();
  await page.click("#recovery-saved");
  await page.waitForSelector("#migrate:not([hidden])");
  out.statusBefore = await page.textContent("#migration-status");
  await page.click("#migrate-button");
  await page.waitForFunction(() => document.querySelector("#migration-status").textContent.includes("done"), null, { timeout: 120000 });
  out.statusAfter = await page.textContent("#migration-status");

  // A fresh load: nothing in memory; unlock again with the password.
  await page.reload();
  await page.waitForSelector("#unlock:not([hidden])");
  await page.fill("#password", "not the password");
  await page.click("#unlock-button");
  await page.waitForFunction(() => document.querySelector("#error").textContent.length > 0);
  out.wrongPasswordError = await page.textContent("#error");
  await page.fill("#password", password);
  await page.click("#unlock-button");
  await page.waitForSelector("#history:not([hidden]) .message", { timeout: 60000 });
  // The history renders session by session: wait for all of it.
  await page.waitForFunction((n) => document.querySelectorAll(".message").length >= n, expected.length, { timeout: 60000 });
  const shown = await page.$$eval(".message .text", (nodes) => nodes.map((n) => n.textContent));
  out.shown = shown;
  out.locks = await page.$$eval(".message .lock", (nodes) => nodes.length);
  out.allShown = expected.every((m) => shown.includes(m));
  out.pageErrors = errors;
  await page.screenshot({ path: process.env.SCREENSHOT ?? "/tmp/polydev-zk-page.png", fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));

// Drives the zero-knowledge page in headless Chromium against a server that may lie (the Rust
// test puts `LyingProxy` in front of the real server and changes its lies between steps). One
// step per run; the browser profile (its localStorage: the page's pins) lives in <profile> and
// persists from one step to the next. Prints a JSON summary of what the page showed.
//   node zk-lies.mjs <base-url> <email:account-password> <master-password> <profile-dir> <step>
// Steps: enable, unlock, migrate, credentials, rotate, lock, idle-lock. Every wait is bounded
// (a hang guard, never a speed check).
import { chromium } from "playwright-core";

const [base, account, password, profile, step] = process.argv.slice(2);
const shots = process.env.SCREENSHOT_DIR ?? "/tmp";
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = { step };
const LONG = { timeout: 90000 };

// Which sections are visible, what the history, the quarantine and the messages say.
const state = (page) => page.evaluate(() => {
  const q = (sel) => [...document.querySelectorAll(sel)];
  const visible = (id) => { const e = document.getElementById(id); return !!e && !e.hidden; };
  return {
    sections: q("main > section").filter((s) => !s.hidden).map((s) => s.id),
    error: document.getElementById("error").textContent,
    keysChanged: visible("keys-changed") ? document.getElementById("keys-changed-message").textContent : null,
    passwordAsked: visible("unlock") || visible("setup"),
    titles: q("#sessions h3").map((h) => h.textContent),
    shown: q("#sessions .message:not(.unreadable)").map((m) => ({
      role: m.querySelector(".role").textContent,
      text: m.querySelector(".text").textContent,
      badge: m.querySelector(".lock, .flag")?.textContent ?? null,
    })),
    unreadable: q("#sessions .message.unreadable").map((m) => ({ id: m.dataset.id, text: m.querySelector(".text").textContent })),
    quarantineVisible: visible("quarantine"),
    quarantined: q("#quarantine li.quarantined").map((li) => ({
      id: li.dataset.id, reason: li.querySelector(".reason").textContent, text: li.querySelector(".text").textContent,
    })),
    lockVisible: visible("lock-bar"),
    lockedStatus: document.getElementById("locked-status")?.textContent ?? "",
  };
});

const workers = (page) => page.workers().map((w) => new URL(w.url()).pathname);

async function signIn(page) {
  await page.goto(base);
  // `email:password` of the account: the page signs in with a session, never a token.
  const at = account.indexOf(":");
  const decided = "#unlock:not([hidden]), #setup:not([hidden]), #keys-changed:not([hidden])";
  // A session from an earlier step of this profile signs in by itself.
  await page.waitForSelector(`#signin:not([hidden]), ${decided}`, LONG);
  if (await page.isVisible("#signin")) {
    await page.fill("#email", account.slice(0, at));
    await page.fill("#account-password", account.slice(at + 1));
    await page.click("#signin-button");
  }
  await page.waitForSelector("#unlock:not([hidden]), #setup:not([hidden]), #keys-changed:not([hidden])", LONG);
}

// Signs in and, if the page asks for it, unlocks; waits for the history, a refusal or an error.
// The history counts as shown once it is visible and no longer busy rendering.
async function unlock(page) {
  await signIn(page);
  await watchDeriving(page);
  if (!(await state(page)).sections.includes("unlock")) return;
  await page.fill("#password", password);
  await page.click("#unlock-button");
  await page.waitForFunction(() => {
    const h = document.getElementById("history");
    return (!h.hidden && !h.hasAttribute("aria-busy"))
      || !document.getElementById("keys-changed").hidden || document.getElementById("error").textContent;
  }, null, LONG);
}

// Records every text the "deriving key" status shows from now on.
const watchDeriving = (page) => page.evaluate(() => {
  window.derivingSeen = [];
  new MutationObserver(() => {
    const d = document.getElementById("deriving");
    if (d && !d.hidden && d.textContent) window.derivingSeen.push({ text: d.textContent, busy: document.body.getAttribute("aria-busy") });
  }).observe(document.body, { subtree: true, attributes: true, childList: true, characterData: true });
});

// Crypto workers that were terminated (a lock drops the one holding the keys).
const closedWorkers = [];
async function workerGone(page) {
  for (let i = 0; i < 200 && !closedWorkers.includes("/worker.js"); i++) await page.waitForTimeout(50);
  return closedWorkers.includes("/worker.js");
}

try {
  const page = context.pages()[0] ?? await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("worker", (w) => w.on("close", () => closedWorkers.push(new URL(w.url()).pathname)));
  if (step === "idle-lock") await page.addInitScript(() => {
    localStorage.setItem("polydev-idle-lock-ms", "1500");
    // How many messages were shown before the lock (it may come soon after the history).
    window.maxShown = 0;
    addEventListener("DOMContentLoaded", () => new MutationObserver(() => {
      window.maxShown = Math.max(window.maxShown, document.querySelectorAll("#sessions .message").length);
    }).observe(document.body, { subtree: true, childList: true }));
  });
  if (step === "enable") {
    await signIn(page);
    await page.fill("#new-password", password);
    await page.fill("#new-password-again", password);
    await page.check("#understood");
    await watchDeriving(page);
    await page.click("#setup-button");
    await page.waitForSelector("#recovery:not([hidden])", LONG);
    out.deriving = await page.evaluate(() => window.derivingSeen);
    out.workers = workers(page);
    out.recoveryKey = (await page.textContent("#recovery-key")).trim();
    out.focused = await page.evaluate(() => document.activeElement?.id);
    await page.screenshot({ path: `${shots}/polydev-zk-page-recovery.png`, fullPage: true });
    await page.click("#recovery-saved");
    await page.waitForSelector("#history:not([hidden]):not([aria-busy])", LONG);
    const dom = await page.evaluate(() => document.documentElement.outerHTML + [...document.querySelectorAll("input")].map((i) => i.value).join(" "));
    out.recoveryKeyInDom = !!out.recoveryKey && dom.includes(out.recoveryKey);
  } else if (step === "unlock") {
    await unlock(page);
    out.deriving = await page.evaluate(() => window.derivingSeen ?? []);
  } else if (step === "migrate") {
    await unlock(page);
    // Nothing left: the button is disabled.
    if (await page.isEnabled("#migrate-button")) await page.click("#migrate-button");
    // Finished (or stopped): the button is usable again.
    await page.waitForFunction(() => !document.getElementById("migrate-button").hasAttribute("aria-busy")
      && (document.getElementById("migration-status").textContent.includes("done") || document.getElementById("error").textContent), null, { timeout: 120000 });
    out.migrationStatus = await page.textContent("#migration-status");
  } else if (step === "credentials") {
    await unlock(page);
    await page.click("#credentials-button");
    await page.waitForFunction(() => document.getElementById("credentials-status").textContent
      || document.getElementById("error").textContent, null, LONG);
    out.credentialsStatus = await page.textContent("#credentials-status");
    out.credentialsUnreadable = await page.$$eval("#credentials-unreadable li", (ns) => ns.map((n) => n.textContent));
  } else if (step === "rotate") {
    await unlock(page);
    await page.fill("#rotate-password", password);
    await page.click("#rotate-button");
    await page.waitForSelector("#recovery:not([hidden]), #error:not(:empty)", { timeout: 120000 });
    out.rotationStatus = await page.textContent("#rotation-status");
    out.rotationProgress = await page.evaluate(() => [document.getElementById("rotation-progress").value, document.getElementById("rotation-progress").max]);
    out.recoveryKey = (await page.textContent("#recovery-key")).trim();
    if (out.recoveryKey) {
      await page.click("#recovery-saved");
      await page.waitForSelector("#history:not([hidden])", LONG);
    }
  } else if (step === "lock") {
    await unlock(page);
    out.before = await state(page);
    out.workersBefore = workers(page);
    await page.focus("#lock-button");
    await page.keyboard.press("Enter");
    await page.waitForSelector("#unlock:not([hidden])", LONG);
    out.workerGone = await workerGone(page);
    out.focused = await page.evaluate(() => document.activeElement?.id);
  } else if (step === "idle-lock") {
    await unlock(page);
    out.maxShown = await page.evaluate(() => window.maxShown);
    await page.waitForFunction(() => document.getElementById("locked-status").textContent.includes("without activity"), null, LONG);
    out.workerGone = await workerGone(page);
  } else {
    throw new Error(`unknown step ${step}`);
  }
  Object.assign(out, await state(page));
  out.pageErrors = errors;
  await page.screenshot({ path: `${shots}/polydev-zk-page-${step}.png`, fullPage: true });
} finally {
  await context.close();
}
console.log(JSON.stringify(out));

// Drives the chat page (/chat) in headless Chromium (Debian's, via playwright-core) against a
// server over the mock upstreams. Writes screenshots to $SCREENSHOT_DIR and prints a JSON
// summary; crates/polydev/tests/it/chat_web_browser.rs checks it against the database.
//   node chat-page.mjs <base-url> <email> <password> [<master-password>]
// Without a master password: two models side by side, a follow-up turn, rename, search,
// export, a quota refusal, delete. With one (a zero-knowledge account): unlock, a turn, reload,
// unlock again and read the history, search.
import { readFile } from "node:fs/promises";
import { chromium } from "playwright-core";

const [base, email, password, master] = process.argv.slice(2);
const dir = process.env.SCREENSHOT_DIR ?? "/tmp";
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const out = { pageErrors: [], shots: [] };
const shot = async (page, name) => {
  const path = `${dir}/chat-${name}.png`;
  await page.screenshot({ path, fullPage: true });
  out.shots.push(path);
};
const answers = (page) => page.$$eval(".turn:last-child .answer", (boxes) => boxes.map((b) => ({
  model: b.dataset.model, status: b.className.replace("answer ", ""),
  text: b.querySelector(".text").textContent, meta: b.querySelector(".meta").textContent,
})));
// Waits until the last turn's answers are all finished.
const settled = (page, count) => page.waitForFunction((n) => {
  const boxes = [...document.querySelectorAll(".turn:last-child .answer")];
  return boxes.length === n && boxes.every((b) => !b.classList.contains("streaming")) && !document.querySelector("#send").disabled;
}, count);

try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 }, acceptDownloads: true });
  const page = await context.newPage();
  page.on("pageerror", (e) => out.pageErrors.push(String(e)));
  await page.goto(`${base}/chat`);
  await page.waitForSelector("#signed-out:not([hidden])");
  out.signedOut = true;
  // Sign in through the API the account page uses (the cookie is the browser context's).
  const session = await (await page.request.get(`${base}/v1/account/session`)).json();
  const signin = await page.request.post(`${base}/v1/account/signin`, {
    data: { email, password }, headers: { "x-csrf-token": session.csrf_token },
  });
  if (!signin.ok()) throw new Error(`sign-in: ${signin.status()} ${await signin.text()}`);
  await page.goto(`${base}/chat`);

  if (master) {
    await page.waitForSelector("#unlock:not([hidden])");
    await page.fill("#master-password", master);
    await page.press("#master-password", "Enter");
    await page.waitForSelector("#app:not([hidden])");
    await page.check('#model-choices input[value="gpt-premium"]');
    await page.check('#model-choices input[value="gemini-eco"]');
    await page.fill("#prompt", "A secret question about our roadmap");
    await page.click("#send");
    await settled(page, 2);
    out.zkAnswers = await answers(page);
    await shot(page, "zero-knowledge");
    // Reload: locked again; unlock and read the history, opened here.
    await page.reload();
    await page.waitForSelector("#unlock:not([hidden])");
    await page.fill("#master-password", master);
    await page.press("#master-password", "Enter");
    await page.waitForSelector("#sessions button.link");
    out.zkTitles = await page.$$eval("#sessions button.link", (b) => b.map((x) => x.textContent));
    await page.click("#sessions button.link");
    await page.waitForSelector(".turn .answer");
    out.zkHistory = await answers(page);
    await page.fill("#search", "roadmap");
    await page.waitForFunction(() => document.querySelectorAll("#sessions button.link").length === 1);
    await page.fill("#search", "nothing like this");
    await page.waitForFunction(() => document.querySelector("#sessions li.muted")?.textContent === "Nothing matches.");
    out.zkSearch = "ok";
  } else {
    await page.waitForSelector("#app:not([hidden])");
    out.quotaBefore = await page.textContent("#quota");
    out.choices = await page.$$eval("#model-choices input", (b) => b.map((x) => x.value));
    await page.check('#model-choices input[value="gpt-premium"]');
    await page.check('#model-choices input[value="claude-normal"]');
    await page.fill("#prompt", "Should we shard the orders table?");
    await page.click("#send");
    // Both columns appear and fill in as the text streams.
    await page.waitForFunction(() => document.querySelectorAll(".turn:last-child .answer").length === 2);
    await settled(page, 2);
    out.first = await answers(page);
    out.quotaAfter = await page.textContent("#quota");
    await shot(page, "side-by-side");
    // A follow-up: each model gets its own earlier turn.
    await page.fill("#prompt", "And with a read replica?");
    await page.press("#prompt", "Control+Enter");
    await settled(page, 2);
    out.second = await answers(page);
    // Rename, search, export.
    await page.click("#rename");
    await page.fill("#rename-title", "Sharding orders");
    await page.press("#rename-title", "Enter");
    await page.waitForFunction(() => document.querySelector("#conversation-title").textContent === "Sharding orders");
    out.titles = await page.$$eval("#sessions button.link", (b) => b.map((x) => x.textContent));
    await page.fill("#search", "read replica");
    await page.waitForFunction(() => document.querySelectorAll("#sessions button.link").length === 1);
    await page.fill("#search", "kubernetes");
    await page.waitForFunction(() => document.querySelector("#sessions li.muted")?.textContent === "Nothing matches.");
    await page.fill("#search", "");
    const [markdown] = await Promise.all([page.waitForEvent("download"), page.click("#export-md")]);
    out.markdown = await readFile(await markdown.path(), "utf8");
    out.markdownName = markdown.suggestedFilename();
    const [json] = await Promise.all([page.waitForEvent("download"), page.click("#export-json")]);
    out.json = JSON.parse(await readFile(await json.path(), "utf8"));
    // The eco tier is used up (the test set it so): the refusal names the limit and the reset.
    await page.uncheck('#model-choices input[value="gpt-premium"]');
    await page.uncheck('#model-choices input[value="claude-normal"]');
    await page.check('#model-choices input[value="gemini-eco"]');
    await page.fill("#prompt", "One more for the cheap model");
    await page.click("#send");
    await page.waitForFunction(() => document.querySelector("#error").textContent.length > 0);
    out.refusal = await page.textContent("#error");
    await shot(page, "quota-refused");
    // History opens from the list after a reload.
    await page.reload();
    await page.waitForSelector("#sessions button.link");
    await page.click("#sessions button.link");
    await page.waitForSelector(".turn .answer");
    out.reopenedTurns = await page.$$eval(".turn", (t) => t.length);
    out.reopenedMeta = await page.$eval(".turn .answer .meta", (m) => m.textContent);
    await shot(page, "history");
    // Phone width: one column.
    await page.setViewportSize({ width: 390, height: 844 });
    out.phoneOverflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
    await shot(page, "phone");
    await page.setViewportSize({ width: 1200, height: 900 });
    // Delete, for good.
    await page.click("#delete");
    await page.click("#delete-confirm");
    await page.waitForFunction(() => document.querySelector("#sessions li.muted")?.textContent === "No conversations yet.");
    out.deleted = true;
  }
} catch (e) {
  out.failure = String(e?.stack ?? e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));

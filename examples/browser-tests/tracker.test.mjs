// Browser tests of the tracker in real Chromium, driven by puppeteer-core.
//
// Run by examples/tests/browser.rs, which starts ferry-server and two
// tracker processes (alice, bob) and passes:
//   ALICE_URL, BOB_URL   the two trackers' pages
//   CHROMIUM             the browser binary (/usr/bin/chromium)
//   SCREENSHOT_DIR       where each step's screenshot goes
// The server is stopped and started again through the harness: this
// script prints `@@server stop` or `@@server start` and waits for `@@ok`
// on its standard input.
//
// Each scenario prints `ok - <name>` or `not ok - <name>`; the script
// exits non-zero when one failed.

import puppeteer from "puppeteer-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";

const ALICE_URL = need("ALICE_URL");
const BOB_URL = need("BOB_URL");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = need("SCREENSHOT_DIR");
const TIMEOUT_MS = 20_000;

function need(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is not set: run this through examples/tests/browser.rs`);
    process.exit(2);
  }
  return v;
}

mkdirSync(SHOTS, { recursive: true });

// --- the harness ------------------------------------------------------

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function server(action) {
  console.log(`@@server ${action}`);
  const { value, done } = await stdinLines.next();
  if (done || value.trim() !== "@@ok") throw new Error(`the harness did not ${action} the server: ${value}`);
}

// --- helpers ----------------------------------------------------------

let shotNo = 0;
async function shot(page, name) {
  shotNo += 1;
  const file = join(SHOTS, `${String(shotNo).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file });
  console.log(`  screenshot ${file}`);
}

async function openDevice(browser, url, who) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  await page.setViewport({ width: 1280, height: 800 });
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on("pageerror", (e) => console.log(`  [${who} page error] ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().includes("Failed to load resource")) console.log(`  [${who} console] ${m.text()}`);
  });
  await page.goto(url);
  await page.waitForSelector("body[data-ready=true]");
  return page;
}

const titlesOf = (page) => page.$$eval("[data-testid=ticket] [data-testid=ticket-title]", (els) => els.map((e) => e.textContent));

async function waitForTitle(page, title) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll("[data-testid=ticket-title]")].some((e) => e.textContent === t),
    {},
    title,
  );
}

async function selectTicket(page, title) {
  await waitForTitle(page, title);
  await page.evaluate((t) => {
    const li = [...document.querySelectorAll("[data-testid=ticket]")].find((e) => e.querySelector("[data-testid=ticket-title]").textContent === t);
    li.click();
  }, title);
  await page.waitForFunction((t) => document.querySelector("[data-testid=detail-title]")?.textContent === t, {}, title);
}

async function setValue(page, selector, value) {
  await page.$eval(selector, (el, v) => {
    el.value = v;
    el.dispatchEvent(new Event("input", { bubbles: true }));
    el.dispatchEvent(new Event("change", { bubbles: true }));
  }, value);
}

async function createTicket(page, title) {
  await setValue(page, "[data-testid=new-title]", title);
  await page.click("[data-testid=create-ticket]");
}

async function editSelected(page, fields) {
  for (const [field, value] of Object.entries(fields)) {
    await setValue(page, `[data-testid=edit-${field}]`, value);
  }
  await page.click("[data-testid=save-ticket]");
}

async function setOffline(page, offline) {
  const checked = await page.$eval("[data-testid=offline-switch]", (e) => e.checked);
  if (checked !== offline) await page.click("[data-testid=offline-switch]");
  await page.waitForFunction(
    (want) => document.querySelector("[data-testid=sync-state]").dataset.state === want,
    {},
    offline ? "offline" : "online",
  );
}

const syncState = (page) => page.$eval("[data-testid=sync-state]", (e) => e.dataset.state);
const queueLen = (page) => page.$eval("[data-testid=queue-len]", (e) => Number(e.textContent));
const message = (page) => page.$eval("[data-testid=message]", (e) => (e.hidden ? "" : e.querySelector(".text").textContent));

async function waitSynced(page) {
  await page.waitForFunction(() =>
    document.querySelector("[data-testid=sync-state]").dataset.state === "online" &&
    document.querySelector("[data-testid=queue-len]").textContent === "0" &&
    document.querySelectorAll("[data-testid=ticket] [data-testid=pending-badge]").length === 0);
}

async function api(url, path) {
  const r = await fetch(new URL(path, url));
  return r.json();
}

function assert(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`);
}

// --- scenarios --------------------------------------------------------

const scenarios = [];
const scenario = (name, fn) => scenarios.push({ name, fn });

scenario("alice creates a ticket, bob's page shows it without reload", async ({ alice, bob }) => {
  const bobNavigations = [];
  bob.on("framenavigated", (f) => bobNavigations.push(f.url()));
  await createTicket(alice, "Printer on fire");
  await waitForTitle(alice, "Printer on fire");
  await shot(alice, "alice-created-ticket");
  await waitForTitle(bob, "Printer on fire");
  await selectTicket(bob, "Printer on fire");
  await shot(bob, "bob-sees-it-live");
  assert(bobNavigations.length === 0, `bob's page reloaded: ${bobNavigations}`);
});

scenario("bob offline, both edit the same ticket, last write wins on both pages", async ({ alice, bob }) => {
  await selectTicket(alice, "Printer on fire");
  await selectTicket(bob, "Printer on fire");
  await setOffline(bob, true);
  await shot(bob, "bob-offline");

  await editSelected(alice, { title: "Printer fixed (alice)" });
  await waitForTitle(alice, "Printer fixed (alice)");
  // Bob edits later, offline: under last write wins his value is the newer.
  await new Promise((r) => setTimeout(r, 50));
  await editSelected(bob, { title: "Printer replaced (bob)" });
  await waitForTitle(bob, "Printer replaced (bob)");
  await bob.waitForSelector("[data-testid=ticket] [data-testid=pending-badge]");
  assert((await queueLen(bob)) > 0, "bob's upload queue holds his edit");
  assert((await titlesOf(bob)).includes("Printer replaced (bob)") && !(await titlesOf(bob)).includes("Printer fixed (alice)"), "bob sees only his own edit while offline");
  await shot(alice, "alice-edited-online");
  await shot(bob, "bob-edited-offline-pending");

  await setOffline(bob, false);
  await waitSynced(bob);
  await waitForTitle(alice, "Printer replaced (bob)");
  await alice.waitForFunction(() => document.querySelector("[data-testid=detail-title]").textContent === "Printer replaced (bob)");
  await bob.waitForFunction(() => document.querySelector("[data-testid=detail-title]").textContent === "Printer replaced (bob)");
  for (const page of [alice, bob]) {
    const titles = await titlesOf(page);
    assert(!titles.includes("Printer fixed (alice)"), "alice's older title is gone");
  }
  await bob.waitForSelector("[data-testid=outcome][data-kind=applied]");
  await shot(alice, "alice-after-sync-lww");
  await shot(bob, "bob-after-sync-lww");
});

scenario("with ferry-server down bob keeps working, and everything syncs after its restart", async ({ alice, bob }) => {
  await server("stop");
  await bob.waitForFunction(() => document.querySelector("[data-testid=sync-state]").dataset.state !== "online");
  await createTicket(bob, "Created while the server was down");
  await selectTicket(bob, "Created while the server was down");
  await editSelected(bob, { status: "done", description: "Written with no server at all." });
  await bob.waitForFunction(() => document.querySelector("[data-testid=detail-title] + .head-badges [data-testid=status-pill]")?.textContent === "done");
  await selectTicket(bob, "Printer replaced (bob)");
  await editSelected(bob, { status: "in_progress" });
  await bob.waitForFunction(() => Number(document.querySelector("[data-testid=queue-len]").textContent) >= 3);
  assert((await syncState(bob)) !== "online", "bob is not connected");
  await shot(bob, "bob-working-with-server-down");

  await server("start");
  await waitSynced(bob);
  await waitForTitle(alice, "Created while the server was down");
  await alice.waitForFunction(() => {
    const li = [...document.querySelectorAll("[data-testid=ticket]")];
    const status = (t) => li.find((e) => e.querySelector("[data-testid=ticket-title]").textContent === t)?.querySelector("[data-testid=status-pill]").textContent;
    return status("Created while the server was down") === "done" && status("Printer replaced (bob)") === "in progress";
  });
  const [a, b] = await Promise.all([api(ALICE_URL, "/api/tickets"), api(BOB_URL, "/api/tickets")]);
  const strip = (rows) => JSON.stringify(rows.map(({ pending, ...r }) => r));
  assert(strip(a) === strip(b), "both devices hold the same tickets");
  await shot(alice, "alice-after-server-restart");
  await shot(bob, "bob-after-server-restart");
});

scenario("bad form input shows a clear message and writes nothing", async ({ alice }) => {
  const before = await api(ALICE_URL, "/api/tickets");
  const queueBefore = (await api(ALICE_URL, "/api/status")).upload_queue;

  await createTicket(alice, "   ");
  await alice.waitForFunction(() => !document.querySelector("[data-testid=message]").hidden);
  assert((await message(alice)) === "the title must not be empty", `message: ${await message(alice)}`);
  await shot(alice, "empty-title-refused");

  await createTicket(alice, "x".repeat(500));
  await alice.waitForFunction(() => document.querySelector("[data-testid=message] .text").textContent.includes("too long"));
  assert((await message(alice)).includes("at most 200"), `message: ${await message(alice)}`);
  await shot(alice, "oversized-title-refused");

  await selectTicket(alice, "Printer replaced (bob)");
  await editSelected(alice, { title: "" });
  await alice.waitForFunction(() => document.querySelector("[data-testid=message] .text").textContent === "the title must not be empty");
  await setValue(alice, "[data-testid=attachment-url]", "not a link");
  await alice.click("[data-testid=add-attachment]");
  await alice.waitForFunction(() => document.querySelector("[data-testid=message] .text").textContent.startsWith("not a web address"));
  await shot(alice, "bad-edit-refused");

  const after = await api(ALICE_URL, "/api/tickets");
  assert(JSON.stringify(after) === JSON.stringify(before), "no ticket changed");
  assert((await api(ALICE_URL, "/api/status")).upload_queue === queueBefore, "nothing was queued");
  assert((await api(ALICE_URL, "/api/tickets/" + after[0].id)).attachments.length === 0, "no attachment was added");
});

scenario("the page reads well on a narrow window", async ({ bob }) => {
  await bob.setViewport({ width: 420, height: 900 });
  await new Promise((r) => setTimeout(r, 200));
  const overflow = await bob.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert(overflow <= 0, `the page scrolls sideways by ${overflow}px`);
  await shot(bob, "bob-narrow-window");
  await bob.setViewport({ width: 1280, height: 800 });
});

// --- run --------------------------------------------------------------

const browser = await puppeteer.launch({
  executablePath: CHROMIUM,
  headless: true,
  // Root in CI: Chromium's sandbox needs user namespaces it may not have.
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
let passed = 0;
let failed = 0;
try {
  const alice = await openDevice(browser, ALICE_URL, "alice");
  const bob = await openDevice(browser, BOB_URL, "bob");
  for (const { name, fn } of scenarios) {
    const started = Date.now();
    try {
      await fn({ alice, bob });
      passed += 1;
      console.log(`ok - ${name} (${Date.now() - started} ms)`);
    } catch (e) {
      failed += 1;
      console.log(`not ok - ${name}: ${e.stack || e}`);
      await shot(alice, "failure-alice").catch(() => {});
      await shot(bob, "failure-bob").catch(() => {});
      break; // later scenarios build on the earlier ones
    }
  }
} finally {
  await browser.close();
}
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);

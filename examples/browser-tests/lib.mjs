// Shared by the browser test scripts: the harness protocol, Chromium,
// page helpers and the scenario runner. See tracker.test.mjs.

import puppeteer from "puppeteer-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";

export const ALICE_URL = need("ALICE_URL");
export const BOB_URL = need("BOB_URL");
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
// Ask the harness (examples/tests/browser.rs) for something; returns the
// rest of its `@@ok` answer.
async function harness(command) {
  console.log(`@@${command}`);
  const { value, done } = await stdinLines.next();
  if (done || !value.startsWith("@@ok")) throw new Error(`the harness did not do "${command}": ${value}`);
  return value.slice("@@ok".length).trim();
}

// Stop or start ferry-server.
export async function server(action) {
  await harness(`server ${action}`);
}

// Start a further tracker process; returns its page's URL.
export async function startTracker(user, ...flags) {
  return harness(["tracker", "start", user, ...flags].join(" "));
}

// --- helpers ----------------------------------------------------------

let shotNo = 0;
export async function shot(page, name) {
  shotNo += 1;
  const file = join(SHOTS, `${String(shotNo).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file });
  console.log(`  screenshot ${file}`);
}

export async function openDevice(browser, url, who) {
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

export const titlesOf = (page) => page.$$eval("[data-testid=ticket] [data-testid=ticket-title]", (els) => els.map((e) => e.textContent));

export async function waitForTitle(page, title) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll("[data-testid=ticket-title]")].some((e) => e.textContent === t),
    {},
    title,
  );
}

export async function selectTicket(page, title) {
  await waitForTitle(page, title);
  await page.evaluate((t) => {
    const li = [...document.querySelectorAll("[data-testid=ticket]")].find((e) => e.querySelector("[data-testid=ticket-title]").textContent === t);
    li.click();
  }, title);
  await page.waitForFunction((t) => document.querySelector("[data-testid=detail-title]")?.textContent === t, {}, title);
}

export async function setValue(page, selector, value) {
  await page.$eval(selector, (el, v) => {
    el.value = v;
    el.dispatchEvent(new Event("input", { bubbles: true }));
    el.dispatchEvent(new Event("change", { bubbles: true }));
  }, value);
}

export async function createTicket(page, title) {
  await setValue(page, "[data-testid=new-title]", title);
  await page.click("[data-testid=create-ticket]");
}

export async function editSelected(page, fields) {
  for (const [field, value] of Object.entries(fields)) {
    await setValue(page, `[data-testid=edit-${field}]`, value);
  }
  await page.click("[data-testid=save-ticket]");
}

export async function setOffline(page, offline) {
  const checked = await page.$eval("[data-testid=offline-switch]", (e) => e.checked);
  if (checked !== offline) await page.click("[data-testid=offline-switch]");
  await page.waitForFunction(
    (want) => document.querySelector("[data-testid=sync-state]").dataset.state === want,
    {},
    offline ? "offline" : "online",
  );
}

export const syncState = (page) => page.$eval("[data-testid=sync-state]", (e) => e.dataset.state);
export const queueLen = (page) => page.$eval("[data-testid=queue-len]", (e) => Number(e.textContent));
export const message = (page) => page.$eval("[data-testid=message]", (e) => (e.hidden ? "" : e.querySelector(".text").textContent));

export async function waitSynced(page) {
  await page.waitForFunction(() =>
    document.querySelector("[data-testid=sync-state]").dataset.state === "online" &&
    document.querySelector("[data-testid=queue-len]").textContent === "0" &&
    document.querySelectorAll("[data-testid=ticket] [data-testid=pending-badge]").length === 0);
}

export async function api(url, path) {
  const r = await fetch(new URL(path, url));
  return r.json();
}

export function assert(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`);
}


// Run `scenarios` ({name, fn}) in order on alice's and bob's pages; a
// failed one stops the run (later ones build on it). Exits the process.
export async function run(scenarios) {
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Root in CI: Chromium's sandbox needs user namespaces it may not have.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  let passed = 0;
  let failed = 0;
  let alice = null;
  let bob = null;
  try {
    alice = await openDevice(browser, ALICE_URL, "alice");
    bob = await openDevice(browser, BOB_URL, "bob");
    for (const { name, fn } of scenarios) {
      const started = Date.now();
      try {
        await fn({ alice, bob, browser });
        passed += 1;
        console.log(`ok - ${name} (${Date.now() - started} ms)`);
      } catch (e) {
        failed += 1;
        console.log(`not ok - ${name}: ${e.stack || e}`);
        await shot(alice, "failure-alice").catch(() => {});
        await shot(bob, "failure-bob").catch(() => {});
        break;
      }
    }
  } catch (e) {
    failed += 1;
    console.log(`not ok - opening the pages: ${e.stack || e}`);
  } finally {
    await browser.close();
  }
  console.log(`browser: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

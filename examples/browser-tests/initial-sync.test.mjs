// Browser test of the initial sync's progress in real Chromium.
//
// Run by examples/tests/browser.rs with ferry-server sending at most 5 ops
// per data line: alice fills the server with tickets, then a third device,
// carol, starts offline (`tracker --offline`), and when her page turns the
// sync on it shows how far the download got (ops received of expected)
// until every ticket is there. Same environment and output as
// tracker.test.mjs.

import { ALICE_URL, assert, openDevice, run, shot, startTracker } from "./lib.mjs";

const scenarios = [];
const scenario = (name, fn) => scenarios.push({ name, fn });
const N = 1500;
const LONG = { timeout: 120_000 };

scenario("a new device's initial sync of a large data set shows its progress", async ({ alice, browser }) => {
  for (let i = 0; i < N; i += 50) {
    await Promise.all(Array.from({ length: Math.min(50, N - i) }, async (_, j) => {
      const r = await fetch(new URL("/api/tickets", ALICE_URL), {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ title: `Ticket ${String(i + j + 1).padStart(4, "0")}` }),
      });
      if (!r.ok) throw new Error(`creating a ticket: ${r.status} ${await r.text()}`);
    }));
  }
  await alice.waitForFunction(() =>
    document.querySelector("[data-testid=sync-state]").dataset.state === "online" &&
    document.querySelector("[data-testid=queue-len]").textContent === "0", LONG);
  await shot(alice, "alice-filled-the-server");

  const url = await startTracker("carol", "--offline");
  const carol = await openDevice(browser, url, "carol");
  assert((await carol.$eval("[data-testid=sync-state]", (e) => e.dataset.state)) === "offline", "carol starts offline");
  assert((await carol.$$("[data-testid=ticket]")).length === 0, "carol has nothing yet");
  await carol.click("[data-testid=offline-switch]");
  // While the download runs the header shows it (and remembers what it showed).
  await carol.waitForFunction(() => document.querySelector("[data-testid=download-progress]").dataset.shown, LONG);
  if (!(await carol.$eval("[data-testid=download-progress]", (e) => e.hidden))) {
    await shot(carol, "carol-initial-sync-progress");
  }
  const shown = await carol.$eval("[data-testid=download-progress]", (e) => e.dataset.shown);
  const [received, expected] = shown.split("/").map(Number);
  assert(expected >= N && received < expected, `progress shown: ${shown}`);

  await carol.waitForFunction((n) => document.querySelectorAll("[data-testid=ticket]").length === n, LONG, N);
  await carol.waitForFunction(() => document.querySelector("[data-testid=download-progress]").hidden);
  await shot(carol, "carol-synced");
});

await run(scenarios);

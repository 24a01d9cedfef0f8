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

import {
  ALICE_URL, BOB_URL, api, assert, createTicket, editSelected, message, run, selectTicket,
  server, setOffline, setValue, shot, syncState, titlesOf, waitForTitle, waitSynced,
} from "./lib.mjs";

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
  await bob.waitForFunction(() => Number(document.querySelector("[data-testid=queue-len]").textContent) > 0);
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
  // The exact message (an earlier "Saved." may still be showing).
  await alice.waitForFunction(() => {
    const box = document.querySelector("[data-testid=message]");
    return !box.hidden && box.dataset.kind === "error" && box.querySelector(".text").textContent === "the title must not be empty";
  });
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

await run(scenarios);

// Browser tests of the tracker's conflict strategies in real Chromium.
//
// Run by examples/tests/browser.rs with ferry-server on
// examples/tracker-strategies.toml (tickets: a domain rule on status,
// manual resolution of the description, last write wins for the rest,
// the audit log) and bob's tracker started with `--restricted` (no
// renames or deletes of tickets while offline). Same environment and
// output as tracker.test.mjs.

import {
  assert, createTicket, editSelected, run, selectTicket, setOffline, setValue, shot, waitSynced,
} from "./lib.mjs";

const scenarios = [];
const scenario = (name, fn) => scenarios.push({ name, fn });

const TITLE = "Paper jam in tray 2";
const detailText = (page, testid) => page.$eval(`#detail [data-testid=${testid}]`, (e) => e.textContent);
const statusOf = (page) => page.$eval("#detail .head-badges [data-testid=status-pill]", (e) => e.textContent);

scenario("restricted: bob's forbidden controls are disabled offline, with the reason", async ({ alice, bob }) => {
  await createTicket(alice, TITLE);
  await selectTicket(alice, TITLE);
  await editSelected(alice, { description: "Tray 2 jams on every print." });
  await alice.waitForFunction(() => document.querySelectorAll("[data-testid=ticket] [data-testid=pending-badge]").length === 0);
  await selectTicket(bob, TITLE);
  await bob.waitForFunction(() => document.querySelector("#detail [data-testid=edit-description]").value === "Tray 2 jams on every print.");
  assert(!(await bob.$eval("[data-testid=edit-title]", (e) => e.disabled)), "the title is editable online");
  await setOffline(bob, true);
  await bob.waitForFunction(() => document.querySelector("[data-testid=edit-title]").disabled);
  assert(await bob.$eval("[data-testid=delete-ticket]", (e) => e.disabled), "Delete is disabled offline");
  const reason = await bob.$eval("[data-testid=restricted-reason]", (e) => (e.hidden ? "" : e.textContent));
  assert(reason.includes("renaming tickets needs the server"), `the reason is shown: ${reason}`);
  await shot(bob, "restricted-controls-disabled-offline");
});

scenario("domain rule and manual resolution: bob's offline edits meet alice's", async ({ alice, bob }) => {
  // Alice, online: the ticket is done, with her description.
  await editSelected(alice, { status: "done" });
  await alice.waitForFunction(() => document.querySelector("#detail .head-badges [data-testid=status-pill]").textContent === "done");
  await editSelected(alice, { description: "Alice: cleared the tray." });
  await alice.waitForFunction(() => document.querySelectorAll("[data-testid=ticket] [data-testid=pending-badge]").length === 0);
  await shot(alice, "alice-done-and-described");

  // Bob, offline, from the old values: reopens it and rewrites the description.
  await editSelected(bob, { status: "in_progress" });
  await bob.waitForFunction(() => document.querySelector("#detail .head-badges [data-testid=status-pill]").textContent === "in progress");
  await editSelected(bob, { description: "Bob: replaced the roller." });
  await bob.waitForFunction(() => Number(document.querySelector("[data-testid=queue-len]").textContent) >= 2);
  await shot(bob, "bob-offline-edits-pending");

  await setOffline(bob, false);
  await waitSynced(bob);
  // Domain rule: done stays done, bob's change answered `merged` with the reason.
  await bob.waitForFunction(() => document.querySelector("#detail .head-badges [data-testid=status-pill]").textContent === "done");
  await bob.waitForSelector("[data-testid=outcome][data-kind=merged]");
  const merged = await bob.$eval("[data-testid=outcome][data-kind=merged] .reason", (e) => e.textContent);
  assert(merged.includes("stays 'done'"), `the merged outcome says why: ${merged}`);
  assert((await statusOf(alice)) === "done", "alice's ticket stays done");
  // Manual: bob's description waits for review; the server kept alice's.
  await bob.waitForSelector("[data-testid=outcome][data-kind=needs_review] [data-testid=review-link]");
  await bob.waitForSelector("[data-testid=conflict]");
  assert((await bob.$eval("[data-testid=conflict-local]", (e) => e.textContent)) === "Bob: replaced the roller.", "the conflict shows bob's value");
  assert((await bob.$eval("[data-testid=conflict-server]", (e) => e.textContent)) === "Alice: cleared the tray.", "the conflict shows the server's value");
  assert((await bob.$eval("[data-testid=conflict-base]", (e) => e.textContent)) === "Tray 2 jams on every print.", "the conflict shows the base");
  await alice.waitForSelector("[data-testid=conflict]");
  assert((await alice.$$("[data-testid=conflict] [data-testid=keep-local]")).length === 0, "alice cannot resolve bob's conflict");
  await bob.click("[data-testid=review-link]");
  await shot(bob, "bob-conflict-to-review");
  await shot(alice, "alice-sees-bobs-conflict");

  // Bob resolves it with a value of his own; both pages show it, and the conflict is gone.
  const merged_text = "Alice cleared the tray; Bob replaced the roller.";
  await setValue(bob, "[data-testid=conflict-custom]", merged_text);
  await bob.click("[data-testid=use-custom]");
  for (const page of [alice, bob]) {
    await page.waitForFunction((v) => document.querySelector("#detail [data-testid=edit-description]").value === v, {}, merged_text);
    await page.waitForFunction(() => document.querySelectorAll("[data-testid=conflict]").length === 0);
  }
  await waitSynced(bob);
  await shot(alice, "alice-after-resolution");
  await shot(bob, "bob-after-resolution");
});

scenario("audit: the activity log shows each change to the ticket", async ({ alice, bob }) => {
  for (const page of [alice, bob]) {
    await page.waitForFunction(() => document.querySelectorAll("#detail [data-testid=activity-entry]").length >= 6);
  }
  const entries = await alice.$$eval("#detail [data-testid=activity-entry]", (els) => els.map((e) => e.textContent));
  const has = (re) => entries.some((e) => re.test(e));
  assert(has(/alice PUT: created/), `the creation is logged: ${entries}`);
  assert(has(/alice PATCH: status → "done" \(applied\)/), `alice's status change is logged: ${entries}`);
  assert(has(/bob PATCH: .*\(merged\)/), `bob's merged change is logged: ${entries}`);
  assert(has(/bob PATCH: .*\(needs_review\)/), `bob's description is logged as needing review: ${entries}`);
  assert(has(/description → "Alice cleared the tray; Bob replaced the roller\."/), `the resolution is logged: ${entries}`);
  await alice.$eval("#detail [data-testid=activity]", (e) => e.scrollIntoView());
  await shot(alice, "activity-log");
  assert((await detailText(bob, "detail-title")) === TITLE, "the title never changed");
});

await run(scenarios);

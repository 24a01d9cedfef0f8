// Browser tests of CRDT descriptions in real Chromium.
//
// Run by examples/tests/browser.rs with ferry-server and both trackers on
// examples/tracker-crdt.toml: a ticket's description is an automerge text
// document the server merges. Same environment and output as
// tracker.test.mjs.

import { assert, createTicket, editSelected, run, selectTicket, setOffline, shot, waitSynced } from "./lib.mjs";

const scenarios = [];
const scenario = (name, fn) => scenarios.push({ name, fn });

const description = (page) => page.$eval("#detail [data-testid=edit-description]", (e) => e.value);
const waitDescription = (page, text) =>
  page.waitForFunction((t) => document.querySelector("#detail [data-testid=edit-description]").value === t, {}, text);

scenario("CRDT: concurrent offline edits of a description both survive", async ({ alice, bob }) => {
  await createTicket(alice, "Printer");
  await selectTicket(alice, "Printer");
  await editSelected(alice, { description: "Printer is broken." });
  await selectTicket(bob, "Printer");
  await waitDescription(bob, "Printer is broken.");
  assert(!(await bob.$eval("[data-testid=description-hint]", (e) => e.hidden)), "the page says descriptions merge");

  await setOffline(bob, true);
  await editSelected(alice, { description: "Printer is broken. Toner replaced." });
  await editSelected(bob, { description: "URGENT: Printer is broken." });
  await waitDescription(alice, "Printer is broken. Toner replaced.");
  await waitDescription(bob, "URGENT: Printer is broken.");
  await shot(alice, "alice-appends-online");
  await shot(bob, "bob-prefixes-offline");

  await setOffline(bob, false);
  await waitSynced(bob);
  const merged = "URGENT: Printer is broken. Toner replaced.";
  await waitDescription(alice, merged);
  await waitDescription(bob, merged);
  assert((await description(alice)) === (await description(bob)), "both pages read the same text");
  await shot(alice, "alice-merged-description");
  await shot(bob, "bob-merged-description");
});

await run(scenarios);

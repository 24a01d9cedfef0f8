// Rows other users wrote are untrusted text on the tracker's page: another
// signed-in user (mallory) writes straight to ferry-server's sync API,
// past any tracker's form checks, and alice's page must neither turn that
// text into something that runs nor into a request to another endpoint.
//
// Run by examples/tests/browser.rs, which also passes:
//   SERVER_URL      ferry-server's base URL
//   MALLORY_TOKEN   a token of the user mallory
//
// Each scenario prints `ok - <name>` or `not ok - <name>`.

import {
  ALICE_URL, api, assert, createTicket, run, selectTicket, shot, waitForTitle,
} from "./lib.mjs";

const SERVER_URL = process.env.SERVER_URL;
const MALLORY_TOKEN = process.env.MALLORY_TOKEN;

let seq = 0;
// Upload one transaction of PUTs as mallory, as any sync client may.
async function malloryPuts(rows) {
  const txId = seq + 1;
  const ops = rows.map(([table, id, data]) => {
    seq += 1;
    return { seq, tx_id: txId, op: "PUT", table, id, data };
  });
  const r = await fetch(new URL("/sync/upload", SERVER_URL), {
    method: "POST",
    headers: { authorization: `Bearer ${MALLORY_TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify({ client_id: "mallory-device", transactions: [{ tx_id: txId, ops }] }),
  });
  const answer = await r.json();
  assert(r.ok, `mallory's upload: ${JSON.stringify(answer)}`);
  for (const o of answer.outcomes) assert(o.outcome === "applied", `mallory's write: ${JSON.stringify(o)}`);
}

async function ticketId(title) {
  const tickets = await api(ALICE_URL, "/api/tickets");
  const t = tickets.find((x) => x.title === title);
  assert(t, `no ticket ${title}`);
  return t.id;
}

const scenarios = [];
const scenario = (name, fn) => scenarios.push({ name, fn });

scenario("an attachment whose url is javascript: is not rendered as a link", async ({ alice }) => {
  assert(SERVER_URL && MALLORY_TOKEN, "SERVER_URL and MALLORY_TOKEN are set");
  await createTicket(alice, "Target of the links");
  await waitForTitle(alice, "Target of the links");
  const id = await ticketId("Target of the links");
  await malloryPuts([
    ["attachments", "evil-link", { ticket_id: id, url: "javascript:document.body.dataset.pwned='yes'", created_at: "1" }],
    ["attachments", "evil-data", { ticket_id: id, url: " data:text/html,<script>alert(1)</script>", created_at: "2" }],
    ["attachments", "fine-link", { ticket_id: id, url: "https://example.com/a.png", created_at: "3" }],
  ]);
  await selectTicket(alice, "Target of the links");
  await alice.waitForFunction(() => document.querySelectorAll("[data-testid=attachment]").length === 3);
  const hrefs = await alice.$$eval("[data-testid=attachment] a[href]", (as) => as.map((a) => a.getAttribute("href")));
  await shot(alice, "untrusted-attachment-urls");
  assert(JSON.stringify(hrefs) === JSON.stringify(["https://example.com/a.png"]), `links on the page: ${JSON.stringify(hrefs)}`);
  const texts = await alice.$$eval("[data-testid=attachment]", (ls) => ls.map((l) => l.textContent));
  assert(texts.some((t) => t.includes("javascript:document.body")), `the bad url is still shown as text: ${JSON.stringify(texts)}`);
  // Clicking what is shown runs nothing.
  await alice.evaluate(() => document.querySelectorAll("[data-testid=attachment] .grow")[0].click());
  await new Promise((r) => setTimeout(r, 200));
  assert((await alice.evaluate(() => document.body.dataset.pwned)) === undefined, "the javascript: url ran");
});

scenario("removing an attachment whose id is a path removes that attachment, not another row", async ({ alice }) => {
  await createTicket(alice, "Must survive");
  await waitForTitle(alice, "Must survive");
  const victim = await ticketId("Must survive");
  const target = await ticketId("Target of the links");
  const sly = `../tickets/${victim}`;
  await malloryPuts([["attachments", sly, { ticket_id: target, url: "https://example.com/innocent", created_at: "4" }]]);
  await selectTicket(alice, "Target of the links");
  await alice.waitForFunction(() => [...document.querySelectorAll("[data-testid=attachment]")].some((l) => l.textContent.includes("innocent")));
  await alice.evaluate(() => {
    const li = [...document.querySelectorAll("[data-testid=attachment]")].find((l) => l.textContent.includes("innocent"));
    li.querySelector("button").click();
  });
  await alice.waitForFunction(() => ![...document.querySelectorAll("[data-testid=attachment]")].some((l) => l.textContent.includes("innocent")));
  await shot(alice, "sly-attachment-removed");
  const tickets = await api(ALICE_URL, "/api/tickets");
  assert(tickets.some((t) => t.id === victim), "the ticket named by the attachment's id was deleted");
  const detail = await api(ALICE_URL, `/api/tickets/${target}`);
  assert(!detail.attachments.some((a) => a.id === sly), "the attachment itself is gone");
});

await run(scenarios);

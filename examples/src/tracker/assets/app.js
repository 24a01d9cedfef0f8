// The tracker's page. It talks only to its own tracker process: JSON
// endpoints under /api for writes, and one event stream (/api/events)
// that sends a snapshot, then every live query diff, status change and
// upload outcome as it happens. Nothing here polls.
"use strict";

const TABLES = ["tickets", "assignments", "comments", "attachments", "app_user", "ferry_conflicts", "activity"];
const STATUS_LABELS = { pending: "pending", in_progress: "in progress", done: "done" };

const state = {
  tables: Object.fromEntries(TABLES.map((t) => [t, new Map()])),
  status: null,
  outcomes: [],
  selected: null,
  filter: "all",
};

const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c);
  }
  return node;
}

// --- messages ---------------------------------------------------------

let messageTimer = null;
function showMessage(text, kind = "error") {
  const box = $("#message");
  $(".text", box).textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(messageTimer);
  if (kind === "info") messageTimer = setTimeout(hideMessage, 5000);
}
function hideMessage() {
  $("#message").hidden = true;
}
$("#message .close").addEventListener("click", hideMessage);

// --- talking to the tracker -------------------------------------------

// A row id as one segment of a request path. Ids are text any user
// chose: "/", "?", "#" and "%" are escaped, so an id such as
// "../tickets/x" names its own row and not another endpoint's.
const seg = (id) => encodeURIComponent(String(id));

async function api(method, path, body) {
  // An id "." or ".." is a dot segment even escaped, which the browser
  // would resolve to another endpoint: such a row cannot be addressed.
  if (/\/(\.|%2e){1,2}(\/|$)/i.test(path)) {
    const message = `cannot address ${path}: a row id "." or ".." is not a path segment`;
    showMessage(message);
    throw new Error(message);
  }
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["content-type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    showMessage(`The tracker process does not answer: ${e.message}`);
    throw e;
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const message = (data && data.error) || text || `HTTP ${response.status}`;
    showMessage(message);
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return data;
}

// Run a write; an error is already shown, so the caller only learns
// whether it worked.
async function attempt(method, path, body) {
  try {
    const data = await api(method, path, body);
    hideMessage();
    return data || {};
  } catch (_) {
    return null;
  }
}

// --- the event stream -------------------------------------------------

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    render();
  });
}

function connectEvents() {
  const source = new EventSource("/api/events");
  source.addEventListener("snapshot", (e) => {
    const snap = JSON.parse(e.data);
    for (const t of TABLES) {
      state.tables[t] = new Map((snap.tables[t] || []).map((r) => [r.id, r]));
    }
    state.status = snap.status;
    state.outcomes = snap.outcomes || [];
    document.body.dataset.ready = "true";
    scheduleRender();
  });
  source.addEventListener("rows", (e) => {
    const diff = JSON.parse(e.data);
    const rows = state.tables[diff.table];
    if (!rows) return;
    for (const id of diff.removed) rows.delete(id);
    for (const row of diff.upserts) rows.set(row.id, row);
    scheduleRender();
  });
  source.addEventListener("status", (e) => {
    state.status = JSON.parse(e.data);
    renderStatus();
    renderRestrictions();
  });
  source.addEventListener("outcome", (e) => {
    state.outcomes.unshift(JSON.parse(e.data));
    state.outcomes.length = Math.min(state.outcomes.length, 200);
    renderOutcomes();
  });
  source.addEventListener("resync", () => {
    source.close();
    connectEvents();
  });
}

// --- rendering --------------------------------------------------------

function render() {
  renderStatus();
  renderTickets();
  renderDetail();
  renderConflicts();
  renderOutcomes();
}

function formatTime(ms) {
  if (!ms) return "never";
  return new Date(Number(ms)).toLocaleTimeString();
}

function renderStatus() {
  const s = state.status;
  if (!s) return;
  $("#who").textContent = `${s.user} \u00b7 device ${String(s.client_id).slice(0, 8)}`;
  const st = $("#sync-state");
  const mode = s.connected ? "online" : s.offline_switch ? "offline" : "connecting";
  st.dataset.state = mode;
  let label = { online: "Connected", offline: "Offline", connecting: "Connecting\u2026" }[mode];
  if (mode === "connecting" && s.last_download_error) label = "Server unreachable, retrying";
  $(".label", st).textContent = label;
  st.title = s.last_download_error || s.server_url;
  $("#offline-switch").checked = !!s.offline_switch;
  $("#queue-len").textContent = s.upload_queue;
  $("#queue-len").parentElement.title = s.upload_queue
    ? `${s.pending_transactions} transaction(s) waiting, the oldest for ${Math.round((s.oldest_pending_age_ms || 0) / 1000)} s`
    : "Nothing waiting for the server";
  // The initial sync (or any large checkpoint): ops received of expected.
  const p = s.download_progress;
  const progress = $("#download-progress");
  progress.hidden = !(p && p.ops_expected > 0 && p.ops_received < p.ops_expected);
  if (!progress.hidden) {
    // The largest download shown so far (the browser tests read it).
    progress.dataset.shown = `${p.ops_received}/${p.ops_expected}`;
    $("b", progress).textContent = `${p.ops_received.toLocaleString()} / ${p.ops_expected.toLocaleString()}`;
    $(".bar span", progress).style.width = `${Math.floor((100 * p.ops_received) / p.ops_expected)}%`;
  }
  $("#last-synced").textContent = formatTime(s.last_synced_at_ms);
  document.title = `${s.user} \u00b7 Ferry tracker`;
}

// Rows come from every user, past any form's checks: an attachment's url
// is a link only when it is an http(s) address (a "javascript:" one would
// run in this page when clicked); anything else is shown as text.
function isWebAddress(url) {
  try {
    const u = new URL(String(url));
    return u.protocol === "http:" || u.protocol === "https:";
  } catch (_) {
    return false;
  }
}

function statusPill(status) {
  return el("span", { class: `pill ${status || ""}`, "data-testid": "status-pill", text: STATUS_LABELS[status] || status || "?" });
}

function pendingBadge(row) {
  return row && row.pending ? el("span", { class: "sync-badge", "data-testid": "pending-badge", title: "A local change not yet confirmed by the server", text: "not synced" }) : null;
}

function ticketsInOrder() {
  const all = [...state.tables.tickets.values()];
  const shown = state.filter === "all" ? all : all.filter((t) => t.status === state.filter);
  // Newest change first, as GET /api/tickets orders them.
  return shown.sort((a, b) => String(b.updated_at || "").localeCompare(String(a.updated_at || "")) || a.id.localeCompare(b.id));
}

function renderTickets() {
  const list = $("#tickets");
  const tickets = ticketsInOrder();
  list.replaceChildren(
    ...tickets.map((t) => el("li", {
      "data-testid": "ticket",
      dataset: { id: t.id },
      class: t.id === state.selected ? "selected" : "",
      onclick: () => select(t.id),
    },
    el("span", { class: "t-title", "data-testid": "ticket-title", text: t.title || "(untitled)" }),
    pendingBadge(t),
    statusPill(t.status))),
  );
  if (tickets.length === 0) {
    list.append(el("li", { class: "empty", text: state.filter === "all" ? "No tickets yet." : "No tickets with this status." }));
  }
  $("#ticket-count").textContent = `${tickets.length} shown`;
}

function childrenOf(table, ticketId) {
  return [...state.tables[table].values()].filter((r) => r.ticket_id === ticketId).sort((a, b) => String(a.created_at || a.id).localeCompare(String(b.created_at || b.id)));
}

function select(id) {
  state.selected = id;
  detailFor = null;
  render();
}

// The detail view is built once per selected ticket; later renders only
// refresh it, leaving what the user is typing alone.
let detailFor = null;

function renderDetail() {
  const box = $("#detail");
  const ticket = state.selected && state.tables.tickets.get(state.selected);
  if (!ticket) {
    if (detailFor !== "") {
      box.replaceChildren(el("p", { class: "empty", text: state.selected ? "This ticket was deleted." : "Select a ticket, or create one." }));
      detailFor = "";
    }
    return;
  }
  if (detailFor !== ticket.id) {
    buildDetail(box, ticket);
    detailFor = ticket.id;
  }
  refreshDetail(box, ticket);
}

function markDirty(e) { e.target.dataset.dirty = "true"; }

function buildDetail(box, ticket) {
  const id = ticket.id;
  const statusSelect = el("select", { name: "status", "data-testid": "edit-status", onchange: markDirty },
    Object.entries(STATUS_LABELS).map(([v, label]) => el("option", { value: v, text: label })));
  const edit = el("form", { class: "edit", "data-testid": "edit-form", novalidate: true, onsubmit: (e) => { e.preventDefault(); saveTicket(id); } },
    el("input", { name: "title", "data-testid": "edit-title", "aria-label": "Title", oninput: markDirty }),
    statusSelect,
    el("textarea", { name: "description", "data-testid": "edit-description", "aria-label": "Description", placeholder: "Description", oninput: markDirty }),
    el("p", { class: "hint", "data-testid": "description-hint", hidden: true, text: "Concurrent edits of the description merge (CRDT): offline changes on two devices both survive." }),
    el("p", { class: "restricted", "data-testid": "restricted-reason", hidden: true }),
    el("div", { class: "actions" },
      el("button", { type: "submit", "data-testid": "save-ticket", text: "Save" }),
      el("span", { class: "spacer" }),
      el("button", { type: "button", class: "danger", "data-testid": "delete-ticket", text: "Delete", onclick: () => deleteTicket(id) })));

  const userSelect = el("select", { name: "user_id", "data-testid": "assign-user", "aria-label": "User" });
  const assignForm = el("form", { onsubmit: async (e) => {
    e.preventDefault();
    if (await attempt("POST", `/api/tickets/${seg(id)}/assignments`, { user_id: userSelect.value })) showMessage("Assigned.", "info");
  } }, userSelect, el("button", { type: "submit", class: "secondary", text: "Assign" }));

  const commentInput = el("input", { name: "body", "data-testid": "comment-body", placeholder: "Add a comment", autocomplete: "off" });
  const commentForm = el("form", { novalidate: true, onsubmit: async (e) => {
    e.preventDefault();
    if (await attempt("POST", `/api/tickets/${seg(id)}/comments`, { body: commentInput.value })) commentInput.value = "";
  } }, commentInput, el("button", { type: "submit", class: "secondary", "data-testid": "add-comment", text: "Comment" }));

  const urlInput = el("input", { name: "url", "data-testid": "attachment-url", placeholder: "https://\u2026", autocomplete: "off" });
  const attachForm = el("form", { novalidate: true, onsubmit: async (e) => {
    e.preventDefault();
    if (await attempt("POST", `/api/tickets/${seg(id)}/attachments`, { url: urlInput.value })) urlInput.value = "";
  } }, urlInput, el("button", { type: "submit", class: "secondary", "data-testid": "add-attachment", text: "Attach" }));

  box.replaceChildren(
    el("div", { class: "detail-head" },
      el("h1", { "data-testid": "detail-title" }),
      el("span", { class: "head-badges" })),
    el("p", { class: "meta", "data-testid": "detail-meta" }),
    edit,
    el("div", { class: "sub" }, el("h2", { text: "Assigned" }), el("div", { class: "chips", "data-testid": "assignments" }), assignForm),
    el("div", { class: "sub" }, el("h2", { text: "Comments" }), el("ul", { "data-testid": "comments" }), commentForm),
    el("div", { class: "sub" }, el("h2", { text: "Attachments" }), el("ul", { "data-testid": "attachments" }), attachForm),
    el("div", { class: "sub" }, el("h2", { text: "Activity" }), el("ul", { class: "activity", "data-testid": "activity" })),
  );
}

function setField(input, value) {
  if (input.dataset.dirty === "true" || document.activeElement === input) return;
  input.value = value ?? "";
}

function refreshDetail(box, t) {
  $("[data-testid=detail-title]", box).textContent = t.title || "(untitled)";
  $(".head-badges", box).replaceChildren(...[pendingBadge(t), statusPill(t.status)].filter(Boolean));
  $("[data-testid=detail-meta]", box).textContent = `#${t.id} \u00b7 created ${formatTime(t.created_at)} \u00b7 updated ${formatTime(t.updated_at)}`;
  const form = $("[data-testid=edit-form]", box);
  setField(form.elements.title, t.title);
  setField(form.elements.status, t.status);
  setField(form.elements.description, t.description);

  const me = state.status && state.status.user;
  const users = [...state.tables.app_user.values()].map((u) => u.id).sort();
  const userSelect = $("[data-testid=assign-user]", box);
  const chosen = userSelect.value;
  userSelect.replaceChildren(...users.map((u) => el("option", { value: u, text: u })));
  if (users.includes(chosen)) userSelect.value = chosen;

  $("[data-testid=assignments]", box).replaceChildren(...childrenOf("assignments", t.id).map((a) =>
    el("span", { class: "chip", "data-testid": "assignment" }, a.user_id, pendingBadge(a),
      el("button", { type: "button", class: "link", title: "Remove", text: "\u00d7", onclick: () => attempt("DELETE", `/api/assignments/${seg(a.id)}`) }))));

  $("[data-testid=comments]", box).replaceChildren(...childrenOf("comments", t.id).map((c) =>
    el("li", { "data-testid": "comment" },
      el("span", { class: "author", text: c.user_id }),
      el("span", { class: "grow", text: c.body }),
      pendingBadge(c),
      c.user_id === me ? el("button", { type: "button", class: "link", title: "Remove", text: "\u00d7", onclick: () => attempt("DELETE", `/api/comments/${seg(c.id)}`) }) : null)));

  $("[data-testid=attachments]", box).replaceChildren(...childrenOf("attachments", t.id).map((a) =>
    el("li", { "data-testid": "attachment" },
      isWebAddress(a.url)
        ? el("a", { class: "grow", href: a.url, target: "_blank", rel: "noopener noreferrer", text: a.url })
        : el("span", { class: "grow", text: a.url }),
      pendingBadge(a),
      el("button", { type: "button", class: "link", title: "Remove", text: "\u00d7", onclick: () => attempt("DELETE", `/api/attachments/${seg(a.id)}`) }))));

  const activity = [...state.tables.activity.values()].filter((a) => a.table_name === "tickets" && a.row_id === t.id)
    .sort((a, b) => String(a.created_at).localeCompare(String(b.created_at)));
  $("[data-testid=activity]", box).replaceChildren(...(activity.length ? activity.map((a) =>
    el("li", { "data-testid": "activity-entry", text: `${formatTime(a.created_at)} \u00b7 ${a.user_id} ${a.op}: ${describeChange(a)} (${a.outcome})` }))
    : [el("li", { text: "No activity recorded (the server's audit log is off for tickets)." })]));
  renderRestrictions();
}

// What an activity row changed: the columns whose value differs between
// its old and new row (not `updated_at`).
function describeChange(a) {
  const parse = (v) => { try { return JSON.parse(v); } catch (_) { return null; } };
  const before = parse(a.old_value);
  const after = parse(a.new_value);
  if (!after || typeof after !== "object") return a.op === "DELETE" ? "deleted" : "";
  if (!before || typeof before !== "object") return `created \u201c${after.title ?? ""}\u201d`;
  const changed = Object.keys(after).filter((k) => k !== "updated_at" && JSON.stringify(after[k]) !== JSON.stringify(before[k]));
  return changed.length ? changed.map((k) => `${k} \u2192 ${JSON.stringify(after[k])}`).join(", ") : "no change kept";
}

// Offline restrictions (`tracker --restricted`): the controls the policy
// forbids are disabled while offline, with the reason.
function renderRestrictions() {
  const box = $("#detail");
  const form = $("[data-testid=edit-form]", box);
  if (!form) return;
  const r = state.status && state.status.restricted_while_offline && state.status.restricted_while_offline.tickets;
  form.elements.title.disabled = !!(r && r.title);
  $("[data-testid=delete-ticket]", box).disabled = !!(r && r.delete);
  $("[data-testid=description-hint]", box).hidden = !(state.status && state.status.crdt_description);
  const reason = $("[data-testid=restricted-reason]", box);
  reason.hidden = !r;
  reason.textContent = r ? `While offline: ${r.title}; ${r.delete}.` : "";
}

function conflictValue(v) {
  if (v === null || v === undefined) return "(empty)";
  try {
    const parsed = JSON.parse(v);
    return typeof parsed === "string" ? parsed : JSON.stringify(parsed);
  } catch (_) {
    return String(v);
  }
}

function renderConflicts() {
  const me = state.status && state.status.user;
  const open = [...state.tables.ferry_conflicts.values()].filter((c) => c.status === "open")
    .sort((a, b) => String(a.created_at).localeCompare(String(b.created_at)));
  const count = $("#conflict-count");
  count.textContent = open.length;
  count.classList.toggle("alert", open.length > 0);
  const box = $("#conflicts");
  if (open.length === 0) {
    box.replaceChildren(el("p", { class: "muted", text: "No conflicts to review." }));
    return;
  }
  // Keep a custom value being typed.
  const typed = new Map([...box.querySelectorAll("input[data-conflict]")].map((i) => [i.dataset.conflict, i.value]));
  box.replaceChildren(...open.map((c) => {
    const ticket = c.table_name === "tickets" ? state.tables.tickets.get(c.row_id) : null;
    const custom = el("input", { "data-conflict": c.id, "data-testid": "conflict-custom", placeholder: "or a value of your own" });
    custom.value = typed.get(c.id) || "";
    const resolve = (choice, value) => attempt("POST", `/api/conflicts/${seg(c.id)}/resolve`, value === undefined ? { choice } : { choice, value });
    const mine = c.user_id === me;
    return el("div", { class: "conflict", id: `conflict-${c.id}`, "data-testid": "conflict", dataset: { id: c.id } },
      el("strong", { text: `${c.field} of ${ticket ? `\u201c${ticket.title}\u201d` : `${c.table_name}/${c.row_id}`}` }),
      el("dl", {},
        el("dt", { text: "yours" }), el("dd", { "data-testid": "conflict-local", text: conflictValue(c.local_value) }),
        el("dt", { text: "server" }), el("dd", { "data-testid": "conflict-server", text: conflictValue(c.server_value) }),
        el("dt", { text: "base" }), el("dd", { "data-testid": "conflict-base", text: conflictValue(c.base_value) })),
      mine
        ? el("div", {},
          el("div", { class: "choices" },
            el("button", { type: "button", class: "secondary", "data-testid": "keep-local", text: "Keep mine", onclick: () => resolve("local") }),
            el("button", { type: "button", class: "secondary", "data-testid": "keep-server", text: "Keep server's", onclick: () => resolve("server") })),
          el("form", { class: "custom", onsubmit: (e) => { e.preventDefault(); resolve("custom", custom.value); } },
            custom, el("button", { type: "submit", "data-testid": "use-custom", text: "Use" })))
        : el("p", { class: "muted", text: `Waiting for ${c.user_id} to decide.` }));
  }));
}

function renderOutcomes() {
  const list = $("#outcomes");
  if (state.outcomes.length === 0) {
    list.replaceChildren(el("li", { class: "muted", text: "No uploads answered yet." }));
    return;
  }
  const words = { applied: "applied", merged: "merged", rejected: "rejected", needs_review: "needs review" };
  list.replaceChildren(...state.outcomes.slice(0, 50).map((o) =>
    el("li", { class: o.kind, "data-testid": "outcome", dataset: { kind: o.kind } },
      el("span", { class: "kind", text: words[o.kind] || o.kind }),
      el("span", { text: o.label }),
      o.reason ? el("span", { class: "reason", text: o.reason }) : null,
      o.conflict_id ? el("a", { class: "reason", href: `#conflict-${o.conflict_id}`, "data-testid": "review-link", text: "review the conflict" }) : null)));
}

// --- actions ----------------------------------------------------------

async function saveTicket(id) {
  const form = $("[data-testid=edit-form]");
  const t = state.tables.tickets.get(id) || {};
  const body = {};
  for (const field of ["title", "status", "description"]) {
    const input = form.elements[field];
    if (!input.disabled && input.value !== (t[field] ?? "")) body[field] = input.value;
  }
  if (Object.keys(body).length === 0) {
    showMessage("Nothing changed.", "info");
    return;
  }
  if (await attempt("PATCH", `/api/tickets/${seg(id)}`, body)) {
    for (const field of ["title", "status", "description"]) delete form.elements[field].dataset.dirty;
    scheduleRender();
    showMessage("Saved.", "info");
  }
}

async function deleteTicket(id) {
  if (await attempt("DELETE", `/api/tickets/${seg(id)}`)) {
    state.selected = null;
    detailFor = null;
    scheduleRender();
  }
}

$("#new-ticket").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = $("#new-title");
  const created = await attempt("POST", "/api/tickets", { title: input.value });
  if (created) {
    input.value = "";
    // Show the new ticket. Its detail is built when the selection moves
    // to it; if the user already opened it (the list shows it before this
    // answer comes), it stays as it is, with any edit in progress.
    state.selected = created.id;
    scheduleRender();
  }
});

$("#status-filter").addEventListener("change", (e) => {
  state.filter = e.target.value;
  renderTickets();
});

$("#offline-switch").addEventListener("change", async (e) => {
  const offline = e.target.checked;
  e.target.disabled = true;
  const status = await attempt("POST", "/api/sync", { offline });
  e.target.disabled = false;
  if (status) {
    state.status = status;
    renderStatus();
    renderRestrictions();
  } else {
    e.target.checked = !offline;
  }
});

connectEvents();

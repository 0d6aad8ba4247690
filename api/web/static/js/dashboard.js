// The wallet page (/app): sign up or in, balance, payments, history that follows settlement.
import * as session from "./session.js";
import {
  $, el, money, parseMoney, when, statusText, reason, describe, say, fieldErrors,
  markInvalid, clearFieldErrors, uuid, sleep, wireSignIn,
} from "./ui.js";

// Polling (docs/web.md): fast while a transaction of the page is still open, slow otherwise.
const POLL_OPEN_MS = 1000;
const POLL_IDLE_MS = 3000;
const PAGE_SIZE = 20;
const OPEN_REFETCH_MAX = 10; // open rows beyond the first page re-read per poll
// A payment is retried with its key on no answer, 503 or 409 (in flight): at most this often.
const PAY_ATTEMPTS_MAX = 3;
const PATHS = { deposit: "/api/v1/payments/deposit", withdraw: "/api/v1/payments/withdraw",
  transfer: "/api/v1/payments/transfer" };

const state = {
  currency: "USD",
  rows: new Map(), // id -> transaction, in the order the API gave
  order: [],
  cursor: null,
  timer: null,
  quietUntil: 0, // no poll before this time (a 429's Retry-After)
  watched: new Map(), // id -> the form whose message follows this transaction
};

function show(which) {
  $("#auth").hidden = which !== "auth";
  $("#wallet").hidden = which !== "wallet";
  $("#who").hidden = which !== "wallet";
  $("#who-email").textContent = session.email();
}

function notice(text, kind = "") {
  say($("#notice"), text, kind);
}

async function call(method, path, options) {
  let answer;
  try {
    answer = await session.api(method, path, options);
  } catch (error) {
    if (error instanceof session.SessionEnded) return null;
    throw error;
  }
  if (answer.status === 429) {
    // Rate limited: polling waits as long as the API asks before it reads again.
    state.quietUntil = Date.now() + 1000 * Number(answer.headers.get("Retry-After") || 1);
  }
  return answer;
}

// ---- balance and history ----
async function loadBalance() {
  const answer = await call("GET", "/api/v1/accounts/me");
  if (answer === null) return;
  if (!answer.ok) return notice(describe(answer), "error");
  const b = answer.body;
  state.currency = b.currency;
  for (const node of document.querySelectorAll(".currency")) node.textContent = `(${b.currency})`;
  $("#bal-available").textContent = money(b.available, b.currency);
  $("#bal-posted").textContent = money(b.posted, b.currency);
  $("#bal-pending").textContent = money(b.pending, b.currency);
}

function merge(items, append) {
  for (const txn of items) {
    if (!state.rows.has(txn.id)) {
      if (append) state.order.push(txn.id);
      else state.order.unshift(txn.id);
    }
    state.rows.set(txn.id, txn);
  }
  if (!append) {
    // New ones came first in the API's order (newest first): keep that order at the top.
    const fresh = items.map((t) => t.id);
    state.order = [...fresh, ...state.order.filter((id) => !fresh.includes(id))];
  }
}

function more(page) {
  return page.items.length < PAGE_SIZE ? null : page.next_cursor;
}

async function loadFirstPage() {
  const answer = await call("GET", `/api/v1/transactions?limit=${PAGE_SIZE}`);
  if (answer === null) return;
  if (!answer.ok) return notice(describe(answer), "error");
  merge(answer.body.items, false);
  // The API gives a cursor after any non-empty page; a short page is the last one.
  if (state.order.length <= PAGE_SIZE) state.cursor = more(answer.body);
  render();
}

async function loadMore() {
  if (state.cursor === null) return;
  const answer = await call("GET", `/api/v1/transactions?limit=${PAGE_SIZE}&cursor=${encodeURIComponent(state.cursor)}`);
  if (answer === null) return;
  if (!answer.ok) return notice(describe(answer), "error");
  merge(answer.body.items, true);
  state.cursor = more(answer.body);
  render();
}

async function refetchOpen() {
  const firstPage = new Set(state.order.slice(0, PAGE_SIZE));
  const open = state.order.filter((id) => !firstPage.has(id) && isOpen(state.rows.get(id)));
  for (const id of open.slice(0, OPEN_REFETCH_MAX)) {
    const answer = await call("GET", `/api/v1/transactions/${id}`);
    if (answer && answer.ok) state.rows.set(id, answer.body);
  }
}

function isOpen(txn) {
  return txn.status === "pending" || txn.status === "processing";
}

function describeTxn(txn) {
  const amount = money(txn.amount, txn.currency);
  if (txn.kind === "deposit") return `Deposit of ${amount}`;
  if (txn.kind === "withdrawal") return `Withdrawal of ${amount}`;
  return txn.direction === "out" ? `${amount} to ${txn.counterparty}` : `${amount} from ${txn.counterparty}`;
}

function row(txn) {
  const signed = (txn.direction === "out" ? "−" : "+") + money(txn.amount, txn.currency);
  const kind = { deposit: "Deposit", withdrawal: "Withdrawal", transfer: txn.direction === "out" ? "Sent" : "Received" }[txn.kind];
  const details = el("button", { type: "button", class: "link", text: "Details",
    "aria-label": `Details: ${describeTxn(txn)}` });
  details.addEventListener("click", () => openDetail(txn.id));
  return el("tr", { "data-id": txn.id, "data-status": txn.status },
    el("td", { "data-label": "Date", text: when(txn.created_at) }),
    el("td", { "data-label": "Type", text: kind }),
    el("td", { "data-label": "Counterparty", text: txn.kind === "transfer" ? txn.counterparty : "Bank" }),
    el("td", { "data-label": "Amount", class: "amount", text: signed }),
    el("td", { "data-label": "Status" }, el("span", { class: `status ${txn.status}`, text: statusText(txn) })),
    el("td", { "data-label": "" }, details));
}

function render() {
  const body = $("#history-rows");
  const focused = document.activeElement && document.activeElement.closest("tr[data-id]");
  const focusedId = focused ? focused.dataset.id : null;
  body.replaceChildren(...state.order.map((id) => row(state.rows.get(id))));
  if (focusedId) {
    const again = body.querySelector(`tr[data-id="${focusedId}"] button`);
    if (again) again.focus();
  }
  $("#history-empty").hidden = state.order.length > 0;
  $("#more").hidden = state.cursor === null;
  followWatched();
}

// A payment form's message follows its transaction until it is final.
function followWatched() {
  for (const [id, { form, replayed }] of state.watched) {
    const txn = state.rows.get(id);
    if (!txn || isOpen(txn)) continue;
    state.watched.delete(id);
    const msg = form.querySelector(".msg");
    const before = replayed ? "Already accepted earlier, so not paid twice. " : "";
    if (txn.status === "settled") say(msg, `${before}${describeTxn(txn)}: settled.`, "ok");
    else say(msg, `${before}${describeTxn(txn)}: failed, ${reason(txn.failure_reason)}.`, "error");
  }
}

// ---- polling ----
function schedule() {
  clearTimeout(state.timer);
  const open = state.watched.size > 0 || state.order.some((id) => isOpen(state.rows.get(id)));
  const wait = Math.max(open ? POLL_OPEN_MS : POLL_IDLE_MS, state.quietUntil - Date.now());
  state.timer = setTimeout(poll, wait);
}

async function poll() {
  if (!session.signedIn()) return;
  if (!document.hidden) {
    // History first, then the balance: a status read as final is in the balance read after it
    // (the ledger changes both in one transaction).
    await loadFirstPage();
    await refetchOpen();
    await loadBalance();
    render();
  }
  schedule();
}

// ---- payments ----
// One intent, one key: the key is made when a form is first sent with these values and reused
// for every retry of them (a double click, no answer, a 503); new values are a new intent.
function intentKey(form, body) {
  const fingerprint = JSON.stringify(body);
  if (!form.intent || form.intent.fingerprint !== fingerprint) form.intent = { key: uuid(), fingerprint };
  return form.intent.key;
}

function readPayment(form) {
  clearFieldErrors(form);
  const amountInput = form.elements.amount;
  const amount = parseMoney(amountInput.value, state.currency);
  if (amount === null) {
    markInvalid(amountInput, `Enter an amount greater than zero, like 12.50.`);
    amountInput.focus();
    return null;
  }
  const body = { amount };
  if (form.dataset.kind === "transfer") {
    const to = form.elements.to.value.trim();
    if (!to) {
      markInvalid(form.elements.to, "Enter the recipient's email.");
      form.elements.to.focus();
      return null;
    }
    body.to = to;
    const note = form.elements.note.value.trim();
    if (note) body.note = note;
  }
  return body;
}

async function pay(form) {
  if (form.busy) return; // a second click while the first is on its way changes nothing
  const body = readPayment(form);
  if (body === null) return;
  const key = intentKey(form, body);
  const button = form.querySelector("button[type=submit]");
  const msg = form.querySelector(".msg");
  form.busy = true;
  button.disabled = true;
  say(msg, "Sending…", "wait");
  let answer = null;
  try {
    for (let attempt = 1; attempt <= PAY_ATTEMPTS_MAX; attempt += 1) {
      answer = await call("POST", PATHS[form.dataset.kind], { body, headers: { "Idempotency-Key": key } });
      if (answer === null) return;
      const retryable = answer.network || answer.status === 503 || answer.status === 409;
      if (!retryable || attempt === PAY_ATTEMPTS_MAX) break;
      say(msg, `${describe(answer)} Retrying with the same payment key…`, "wait");
      await sleep(1000 * Number(answer.headers.get("Retry-After") || attempt));
    }
    settle(form, answer);
  } finally {
    form.busy = false;
    button.disabled = false;
  }
}

function settle(form, answer) {
  const msg = form.querySelector(".msg");
  if (answer.status === 202) {
    const txn = answer.body;
    form.intent = null;
    form.reset();
    const replayed = answer.headers.get("Idempotent-Replayed") === "true";
    say(msg, replayed
      ? `Already accepted earlier, so not paid twice: ${describeTxn(txn)} is the same payment. Settling…`
      : `${describeTxn(txn)}: accepted, settling…`, "wait");
    state.watched.set(txn.id, { form, replayed });
    merge([txn], false);
    render();
    poll();
    return;
  }
  fieldErrors(form, answer);
  if (answer.network) {
    say(msg, "No answer from Kizo, so the payment may or may not be recorded. Press the button again: it resends the same payment key, so it can never pay twice.", "error");
  } else {
    say(msg, describe(answer), "error");
  }
}

// ---- detail, export ----
async function openDetail(id) {
  const dialog = $("#detail");
  const list = $("#detail-body");
  list.replaceChildren(el("dt", { text: "Loading" }), el("dd", { text: "…" }));
  dialog.showModal();
  dialog.dataset.opener = id;
  const answer = await call("GET", `/api/v1/transactions/${id}`);
  if (answer === null) return dialog.close();
  if (!answer.ok) {
    list.replaceChildren(el("dt", { text: "Error" }), el("dd", { text: describe(answer) }));
    return;
  }
  const t = answer.body;
  const fields = [
    ["Id", t.id], ["Type", t.kind], ["Direction", t.direction === "in" ? "In" : "Out"],
    ["Amount", money(t.amount, t.currency)], ["Counterparty", t.counterparty],
    ["Status", statusText(t)], ["Note", t.note || "–"], ["Created", when(t.created_at)],
    ["Settled", when(t.settled_at)],
  ];
  list.replaceChildren(...fields.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
}

async function exportCsv() {
  const answer = await call("GET", "/api/v1/transactions/export.csv", { blob: true });
  if (answer === null) return;
  if (!answer.ok) return notice(describe(answer), "error");
  const url = URL.createObjectURL(answer.body);
  const link = el("a", { href: url, download: "kizo-transactions.csv" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
  notice("Your history was exported as kizo-transactions.csv.", "ok");
}

// ---- sign up, sessions ----
function wireSignUp() {
  const form = $("#signup-form");
  const msg = $("#signup-msg");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    const name = form.elements.name.value.trim();
    const who = form.elements.email.value.trim();
    const password = form.elements.password.value;
    const missing = [["name", !name, "Enter your name."], ["email", !who, "Enter your email."],
      ["password", password.length < 8, "Use at least 8 characters."]].filter((m) => m[1]);
    for (const [field, , text] of missing) markInvalid(form.elements[field], text);
    if (missing.length) return form.elements[missing[0][0]].focus();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    say(msg, "Creating your wallet…");
    const answer = await session.signUp(name, who, password);
    button.disabled = false;
    if (answer.ok) {
      form.reset();
      say(msg, "");
      return start();
    }
    fieldErrors(form, answer);
    say(msg, describe(answer), "error");
  });
}

function reset() {
  clearTimeout(state.timer);
  state.rows.clear();
  state.order = [];
  state.cursor = null;
  state.watched.clear();
  $("#history-rows").replaceChildren();
  for (const form of document.querySelectorAll("form.pay")) {
    form.intent = null;
    say(form.querySelector(".msg"), "");
  }
}

async function start() {
  reset();
  show("wallet");
  notice("");
  $("#wallet-title").focus();
  await loadFirstPage();
  await loadBalance();
  schedule();
}

function init() {
  session.onSessionEnd(() => {
    reset();
    show("auth");
    notice("Your session has ended. Please sign in again.", "error");
  });
  wireSignIn(session.signIn, start);
  wireSignUp();
  for (const form of document.querySelectorAll("form.pay")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      pay(form);
    });
  }
  $("#more").addEventListener("click", loadMore);
  $("#export").addEventListener("click", exportCsv);
  $("#logout").addEventListener("click", async () => {
    reset();
    await session.signOut();
    show("auth");
    notice("You are signed out.", "ok");
    $("#signin-email").focus();
  });
  const dialog = $("#detail");
  $("#detail-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => {
    // The row may have been redrawn meanwhile: focus its button as it is now.
    const back = $(`#history-rows tr[data-id="${dialog.dataset.opener}"] button`);
    if (back) back.focus();
  });
  document.addEventListener("visibilitychange", () => !document.hidden && session.signedIn() && poll());
  if (session.signedIn()) start();
  else show("auth");
}

init();

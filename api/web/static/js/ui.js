// What both pages share: money in minor units, messages for the API's problems, small DOM helpers.

export function $(selector, root = document) {
  return root.querySelector(selector);
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("data-") || name.startsWith("aria-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

// Money: integers of minor units both ways; never a float for an amount.
export function digits(currency) {
  try {
    return new Intl.NumberFormat("en", { style: "currency", currency }).resolvedOptions()
      .maximumFractionDigits;
  } catch {
    return 2;
  }
}

export function money(minor, currency) {
  const d = digits(currency);
  const sign = minor < 0 ? "-" : "";
  const abs = String(Math.abs(minor)).padStart(d + 1, "0");
  const whole = abs.slice(0, abs.length - d) || "0";
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `${sign}${grouped}${d ? "." + abs.slice(abs.length - d) : ""} ${currency}`;
}

// "12.34" -> 1234 (for 2 digits); null when not a positive amount with at most `d` decimals.
export function parseMoney(text, currency) {
  const d = digits(currency);
  const clean = text.trim().replace(/[,\s]/g, "");
  const match = /^(\d{1,15})(?:\.(\d*))?$/.exec(clean);
  if (match === null || (match[2] || "").length > d) return null;
  const minor = Number(match[1]) * 10 ** d + Number((match[2] || "").padEnd(d, "0") || "0");
  return Number.isSafeInteger(minor) && minor > 0 ? minor : null;
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "medium" });
}

const REASONS = {
  insufficient_funds: "not enough available funds",
  bank_declined: "the bank declined it",
};

export function reason(code) {
  return REASONS[code] || (code ? code.replaceAll("_", " ") : "");
}

export function statusText(txn) {
  const words = { pending: "Pending", processing: "Processing", settled: "Settled", failed: "Failed" };
  const base = words[txn.status] || txn.status;
  return txn.status === "failed" && txn.failure_reason ? `${base}: ${reason(txn.failure_reason)}` : base;
}

// The message for an answer that is not a success: every problem type the API returns gets a
// sentence a person can act on; the API's own detail follows when it adds something.
export function describe(answer, context = "") {
  if (answer.network) {
    return "No answer from Kizo (network problem).";
  }
  const problem = answer.problem || {};
  const slug = (problem.type || "").split("/").pop();
  const wait = answer.headers.get("Retry-After");
  switch (slug) {
    case "too-many-requests":
      return `Too many requests. Please wait ${wait || "a few"} seconds, then try again.`;
    case "unauthorized":
      return context === "signin" ? "Wrong email or password." : "Your session has ended. Please sign in again.";
    case "forbidden":
      return "This page is for administrators only.";
    case "email-taken":
      return "A wallet with this email already exists. Sign in instead.";
    case "unknown-recipient":
      return "No Kizo user has that email. Check the recipient's address.";
    case "self-transfer":
      return "You cannot send money to yourself.";
    case "invalid-amount":
      return `That amount is not allowed: ${problem.detail}.`;
    case "request-in-flight":
      return "This payment is still being processed. Wait a moment: it is not paid twice.";
    case "idempotency-key-reused":
      return "This payment's key was already used for a different payment. Start a new payment.";
    case "busy":
    case "service-unavailable":
      return `Kizo is briefly unavailable. Please retry${wait ? ` in ${wait} s` : ""}; a retry never pays twice.`;
    case "invalid-request":
      return "Please correct the highlighted fields.";
    case "not-found":
      return "Not found.";
    default:
      return problem.detail ? `${problem.title || "Error"}: ${problem.detail}.` : `Unexpected answer (HTTP ${answer.status}).`;
  }
}

export function say(node, text, kind = "") {
  node.textContent = text;
  node.className = node.className.replace(/\b(ok|error|wait)\b/g, "").trim();
  if (kind) node.classList.add(kind);
}

// Field problems (422 "errors") next to their inputs, linked for screen readers.
export function fieldErrors(form, answer) {
  clearFieldErrors(form);
  const errors = (answer.problem && answer.problem.errors) || [];
  for (const { field, message } of errors) {
    const input = form.elements[field.split(".")[0]];
    if (!input) continue;
    markInvalid(input, message);
  }
  return errors.length;
}

export function markInvalid(input, message) {
  const id = `${input.id}-error`;
  let note = document.getElementById(id);
  if (note === null) {
    note = el("p", { class: "field-error", id });
    input.insertAdjacentElement("afterend", note);
  }
  note.textContent = message;
  input.setAttribute("aria-invalid", "true");
  const described = (input.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
  if (!described.includes(id)) input.setAttribute("aria-describedby", [...described, id].join(" "));
}

export function clearFieldErrors(form) {
  for (const note of form.querySelectorAll(".field-error")) {
    const input = form.querySelector(`[aria-describedby~="${note.id}"]`);
    if (input) {
      input.removeAttribute("aria-invalid");
      const rest = input.getAttribute("aria-describedby").split(" ").filter((x) => x !== note.id);
      if (rest.length) input.setAttribute("aria-describedby", rest.join(" "));
      else input.removeAttribute("aria-describedby");
    }
    note.remove();
  }
}

// A random UUID (v4) without crypto.randomUUID, which exists only in secure contexts.
export function uuid() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// The sign-in form both pages share; `done` runs once signed in.
export function wireSignIn(signIn, done) {
  const form = $("#signin-form");
  const msg = $("#signin-msg");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    const who = form.elements.email.value.trim();
    const password = form.elements.password.value;
    if (!who) return markInvalid(form.elements.email, "Enter your email."), form.elements.email.focus();
    if (!password) return markInvalid(form.elements.password, "Enter your password."), form.elements.password.focus();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    say(msg, "Signing in…");
    const answer = await signIn(who, password);
    button.disabled = false;
    if (answer.ok) {
      say(msg, "");
      form.reset();
      done();
    } else {
      fieldErrors(form, answer);
      say(msg, describe(answer, "signin"), "error");
    }
  });
}

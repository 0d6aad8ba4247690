// The operations console (/app/console): what the admin routes report, refreshed every few seconds.
import * as session from "./session.js";
import { $, el, money, when, describe, say, wireSignIn } from "./ui.js";

const POLL_MS = 5000;
let timer = null;

function show(which) {
  $("#auth").hidden = which !== "auth";
  $("#ops").hidden = which !== "ops";
  $("#who").hidden = which !== "ops";
  $("#who-email").textContent = session.email();
}

function notice(text, kind = "") {
  say($("#notice"), text, kind);
}

function figures(list, pairs) {
  list.replaceChildren(...pairs.flatMap(([label, value]) => [
    el("div", {}, el("dt", { text: label }), el("dd", { text: value }))]));
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value === "+Inf") return "over the largest bucket";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${Number(value).toFixed(1)} s`;
}

function rows(table, items, cells) {
  const body = table.querySelector("tbody");
  body.replaceChildren(...items.map((item) => el("tr", {}, ...cells(item).map(([label, text, cls]) =>
    el("td", { "data-label": label, text: String(text), ...(cls ? { class: cls } : {}) })))));
  const empty = table.parentElement.querySelector(".empty");
  if (empty) empty.hidden = items.length > 0;
}

function overview(o) {
  const lag = o.settlement_lag;
  figures($("#lag"), [
    ["Oldest open intent", o.backlog.oldest_open_age_s === null ? "none open" : seconds(o.backlog.oldest_open_age_s)],
    ["p50 since workers started", seconds(lag.p50_s)],
    ["p99 since workers started", seconds(lag.p99_s)],
    ["Settled or failed, counted", `${lag.count} (workers answering: ${lag.reachable} of ${lag.workers})`],
  ]);
  const j = o.janitor;
  figures($("#backlog"), [
    ["Open intents (pending, processing)", String(o.backlog.open)],
    ["Jobs queued in SAQ", j.reachable ? String(j.queued) : "unknown (janitor not answering)"],
    ["By shard", j.reachable ? Object.entries(j.queue_depth).map(([s, n]) => `${s}: ${n}`).join(", ") || "–" : "–"],
  ]);
  figures($("#janitor"), j.reachable ? [
    ["Passes", Object.entries(j.passes).map(([r, n]) => `${r} ${n}`).join(", ") || "none yet"],
    ["Last pass", j.last_pass_age_s === null ? "none yet" : `${j.last_pass_age_s} s ago`],
    ["Unknown bank outcomes", String(j.unresolved)],
    ["Findings of the last pass", Object.entries(j.findings).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(", ") || "none"],
  ] : [["Status", `not answering (${j.error})`]]);
  figures($("#attention-count"), [
    ["Flagged intents", String(o.needs_attention.count)],
    ["Open reconciliation findings", String(o.findings.items.length)],
  ]);
  rows($("#attention-table"), o.needs_attention.items, (t) => [
    ["Created", when(t.created_at)], ["Kind", t.kind], ["Amount", money(t.amount, t.currency), "amount"],
    ["Re-drives", t.attempts], ["Re-arms", t.rearms], ["Id", t.id, "code"]]);
  rows($("#findings-table"), o.findings.items, (f) => [
    ["Found", when(f.found_at)], ["Kind", f.kind], ["Subject", f.subject, "code"], ["Detail", f.detail]]);
  const grafana = $("#grafana");
  grafana.hidden = !o.grafana_url;
  if (o.grafana_url) {
    $("#grafana-overview").href = `${o.grafana_url}/d/kizo-overview`;
    $("#grafana-incident").href = `${o.grafana_url}/d/kizo-incident`;
  }
}

function toxic(t) {
  const attrs = Object.entries(t.attributes).map(([k, v]) => `${k}=${v}`).join(" ");
  return `${t.name} (${t.type}, ${t.stream}${t.toxicity < 1 ? `, ${Math.round(t.toxicity * 100)} %` : ""}${attrs ? `: ${attrs}` : ""})`;
}

function faults(f) {
  say($("#faults-summary"), !f.reachable
    ? `The fault proxy is not answering (${f.error}).`
    : f.active === 0 ? `No active fault on ${f.proxies.length} proxies.` : `${f.active} active fault(s).`,
  f.active > 0 ? "wait" : "");
  rows($("#faults-table"), f.proxies, (p) => [
    ["Proxy", p.name], ["Enabled", p.enabled ? "yes" : "NO (disabled)"],
    ["Listen → upstream", `${p.listen} → ${p.upstream}`, "code"],
    ["Toxics", p.toxics.map(toxic).join("; ") || "none"]]);
}

function chaos(runs) {
  const body = $("#chaos-table tbody");
  body.replaceChildren(...runs.items.map((r) => el("tr", {},
    el("td", { "data-label": "Finished", text: when(r.finished_at) }),
    el("td", { "data-label": "Scenario", text: r.scenario }),
    el("td", { "data-label": "Seed", text: String(r.seed ?? "–") }),
    el("td", { "data-label": "Mutation", text: r.mutation || "none" }),
    el("td", { "data-label": "Verdict" }, el("span", { class: `status verdict-${r.verdict}`, text: r.verdict })),
    el("td", { "data-label": "Violations", text: String(r.violations ?? "–") }),
    el("td", { "data-label": "Lag p99", text: r.lag_p99_ms === null ? "–" : `${Math.round(r.lag_p99_ms)} ms` }),
    el("td", { "data-label": "Convergence", text: r.convergence_s === null ? "–" : `${r.convergence_s} s` }))));
  $("#chaos-table").parentElement.querySelector(".empty").hidden = runs.items.length > 0;
}

async function call(path) {
  try {
    return await session.api("GET", path);
  } catch (error) {
    if (error instanceof session.SessionEnded) return null;
    throw error;
  }
}

async function refresh() {
  const [o, f, c] = await Promise.all([
    call("/api/v1/admin/overview"), call("/api/v1/admin/faults"), call("/api/v1/admin/chaos-runs")]);
  if (o === null || f === null || c === null) return false;
  const failed = [o, f, c].find((a) => !a.ok);
  if (failed) {
    notice(failed.status === 403
      ? `This console is for administrators; ${session.email()} is not one. Your wallet is at /app.`
      : describe(failed), "error");
    $("#ops").hidden = failed.status === 403;
    return failed.status !== 403;
  }
  notice("");
  overview(o.body);
  faults(f.body);
  chaos(c.body);
  $("#updated").textContent = `Updated ${new Date().toLocaleTimeString("en-GB")}, every ${POLL_MS / 1000} s.`;
  return true;
}

async function loop() {
  clearTimeout(timer);
  if (!session.signedIn()) return;
  const goOn = document.hidden ? true : await refresh();
  if (goOn) timer = setTimeout(loop, POLL_MS);
}

function start() {
  show("ops");
  $("#ops-title").focus();
  loop();
}

function init() {
  session.onSessionEnd(() => {
    clearTimeout(timer);
    show("auth");
    notice("Your session has ended. Please sign in again.", "error");
  });
  wireSignIn(session.signIn, start);
  $("#logout").addEventListener("click", async () => {
    clearTimeout(timer);
    await session.signOut();
    show("auth");
    notice("You are signed out.", "ok");
    $("#signin-email").focus();
  });
  if (session.signedIn()) start();
  else show("auth");
}

init();

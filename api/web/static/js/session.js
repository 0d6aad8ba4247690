// The session and every call to /api/v1 (docs/web.md, "Tokens").
//
// The access token lives only in this module's memory: no storage a script of another page
// could read, gone with the tab. The refresh token is kept in sessionStorage (this tab only) so
// that a reload keeps the session; the API rotates it on every use and revokes the whole family
// when a rotated one is presented again, so a stolen copy dies at the next refresh. One refresh
// runs at a time: concurrent calls that find the access token expired wait for the same one
// (two refreshes with one token would look like reuse and end the session).

const REFRESH_KEY = "kizo.refresh";
const EMAIL_KEY = "kizo.email";
const TIMEOUT_MS = 15000;

let access = null;
let accessExpiresAt = 0;
let accessLifetimeMs = 0;
let refreshing = null;
const listeners = new Set();

export class SessionEnded extends Error {}

export function onSessionEnd(listener) {
  listeners.add(listener);
}

export function signedIn() {
  return sessionStorage.getItem(REFRESH_KEY) !== null;
}

export function email() {
  return sessionStorage.getItem(EMAIL_KEY) || "";
}

function keep(pair, who) {
  access = pair.access_token;
  accessLifetimeMs = pair.expires_in * 1000;
  accessExpiresAt = Date.now() + accessLifetimeMs;
  sessionStorage.setItem(REFRESH_KEY, pair.refresh_token);
  if (who) sessionStorage.setItem(EMAIL_KEY, who);
}

function forget() {
  access = null;
  accessExpiresAt = 0;
  sessionStorage.removeItem(REFRESH_KEY);
  sessionStorage.removeItem(EMAIL_KEY);
}

function end(problem) {
  forget();
  for (const listener of listeners) listener(problem);
}

// One HTTP exchange. Resolves to {status, ok, headers, body, problem, network}; never throws:
// a network failure is {status: 0, network: true}.
export async function send(method, path, { body, headers = {}, token = null, blob = false } = {}) {
  const init = { method, headers: { ...headers }, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (token) init.headers.Authorization = `Bearer ${token}`;
  init.signal = AbortSignal.timeout(TIMEOUT_MS);
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    return { status: 0, ok: false, network: true, headers: new Headers(), body: null, problem: null };
  }
  const type = response.headers.get("Content-Type") || "";
  let parsed = null;
  if (blob && response.ok) parsed = await response.blob();
  else if (type.includes("json")) parsed = await response.json().catch(() => null);
  return {
    status: response.status,
    ok: response.ok,
    network: false,
    headers: response.headers,
    body: parsed,
    problem: type.startsWith("application/problem+json") ? parsed : null,
  };
}

export async function signIn(who, password) {
  const answer = await send("POST", "/api/v1/auth/signin", { body: { email: who, password } });
  if (answer.ok) keep(answer.body, who);
  return answer;
}

export async function signUp(name, who, password) {
  const answer = await send("POST", "/api/v1/auth/signup", { body: { email: who, password, name } });
  if (answer.ok) keep(answer.body, answer.body.user.email);
  return answer;
}

export async function signOut() {
  const token = sessionStorage.getItem(REFRESH_KEY);
  forget();
  if (token) await send("POST", "/api/v1/auth/logout", { body: { refresh_token: token } });
}

// A fresh access token from the refresh token; shared by every caller that needs one now.
function refresh() {
  if (refreshing === null) {
    refreshing = (async () => {
      const token = sessionStorage.getItem(REFRESH_KEY);
      if (token === null) throw new SessionEnded("not signed in");
      const answer = await send("POST", "/api/v1/auth/refresh", { body: { refresh_token: token } });
      if (answer.ok) {
        keep(answer.body, null);
        return;
      }
      if (answer.status === 401) {
        end(answer.problem);
        throw new SessionEnded("session ended");
      }
      // The network or the server failed: the refresh token may still be good, keep it.
      throw Object.assign(new Error("refresh failed"), { answer });
    })().finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

function expiring() {
  // Refresh a little before expiry (a quarter of the lifetime, 1.5 to 30 s), so a request does
  // not leave with a token that expires on its way (the token's expiry is in whole seconds).
  const margin = Math.min(30000, Math.max(1500, accessLifetimeMs / 4));
  return access === null || Date.now() >= accessExpiresAt - margin;
}

// An authenticated call: refreshes first when the access token is (nearly) expired, and once
// more if the API still answers 401. Throws SessionEnded when the session cannot go on.
export async function api(method, path, options = {}) {
  if (expiring()) {
    try {
      await refresh();
    } catch (error) {
      if (error instanceof SessionEnded) throw error;
      return error.answer;
    }
  }
  let answer = await send(method, path, { ...options, token: access });
  if (answer.status === 401) {
    try {
      await refresh();
    } catch (error) {
      if (error instanceof SessionEnded) throw error;
      return error.answer;
    }
    answer = await send(method, path, { ...options, token: access });
    if (answer.status === 401) {
      end(answer.problem);
      throw new SessionEnded("session ended");
    }
  }
  return answer;
}

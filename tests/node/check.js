// Toxiproxy's own Node client (toxiproxy-node-client), used unchanged against Kizo's fault
// proxy: a whole proxy and toxic lifecycle, and a latency toxic seen on a real connection.
// Usage: node check.js http://127.0.0.1:<api port> <free port for the proxy to listen on>
// Prints one JSON line of what it saw; exits 1 (with the reason) on the first surprise.
"use strict";
const net = require("net");
const { Toxiproxy, ToxiproxyError } = require("toxiproxy-node-client");

const [apiUrl, listenPort] = process.argv.slice(2);
const seen = {};

function check(condition, what) {
  if (!condition) throw new Error(`unexpected: ${what}`);
}

function echoServer() {
  return new Promise((resolve) => {
    const server = net.createServer((socket) => socket.pipe(socket));
    server.listen(0, "127.0.0.1", () => resolve(server));
  });
}

function roundTripMs(port) {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const socket = net.connect(port, "127.0.0.1", () => socket.write("ping"));
    socket.setTimeout(5000, () => reject(new Error("round trip timed out")));
    socket.on("data", () => {
      socket.destroy();
      resolve(Number(process.hrtime.bigint() - started) / 1e6);
    });
    socket.on("error", reject);
  });
}

async function main() {
  const echo = await echoServer();
  const upstream = `127.0.0.1:${echo.address().port}`;
  const listen = `127.0.0.1:${listenPort}`;
  const toxiproxy = new Toxiproxy(apiUrl);
  seen.version = await toxiproxy.getVersion();
  await toxiproxy.reset();

  const proxy = await toxiproxy.createProxy({ name: "node_echo", listen, upstream });
  check(proxy.listen === listen && proxy.upstream === upstream && proxy.enabled, "created proxy");
  const all = await toxiproxy.getAll();
  check(Object.keys(all).includes("node_echo"), "getAll lists the proxy");
  seen.direct_ms = await roundTripMs(listenPort);

  const toxic = await proxy.addToxic({
    name: "slow", type: "latency", stream: "downstream", toxicity: 1,
    attributes: { latency: 200, jitter: 0 },
  });
  check(toxic.attributes.latency === 200, "toxic attributes");
  const fetched = await proxy.getToxic("slow");
  check(fetched.type === "latency" && fetched.stream === "downstream", "getToxic");
  seen.toxic_ms = await roundTripMs(listenPort);
  check(seen.toxic_ms >= 190, `latency toxic: a round trip took ${seen.toxic_ms} ms`);

  const updated = await fetched.update({ attributes: { latency: 20, jitter: 0 }, toxicity: 1 });
  check(updated.attributes.latency === 20, "toxic update");
  await updated.remove();
  const again = await toxiproxy.get("node_echo");
  const toxics = await (await fetch(`${apiUrl}/proxies/node_echo/toxics`)).json();
  check(Array.isArray(toxics) && toxics.length === 0, "toxic removed");

  const down = await again.update({ enabled: false, listen, upstream });
  check(down.enabled === false, "proxy disabled");
  let refused = false;
  try { await roundTripMs(listenPort); } catch (e) { refused = true; }
  check(refused, "a disabled proxy refuses connections");

  // As in Toxiproxy 2.12 (AddOrReplace): populating a proxy with its own listen and upstream
  // leaves it as it is, disabled here; reset enables every proxy.
  const populated = await toxiproxy.populate([{ name: "node_echo", listen, upstream, enabled: true }]);
  check(populated.node_echo !== undefined, "populate answers the proxy");
  check((await toxiproxy.get("node_echo")).enabled === false, "populate leaves an unchanged proxy");
  await toxiproxy.reset();
  check((await toxiproxy.get("node_echo")).enabled === true, "reset enables it");
  seen.after_reset_ms = await roundTripMs(listenPort);

  await (await toxiproxy.get("node_echo")).remove();
  try {
    await toxiproxy.get("node_echo");
    check(false, "a deleted proxy is still there");
  } catch (error) {
    check(error instanceof ToxiproxyError || /not found/i.test(String(error)), `get after delete: ${error}`);
    seen.missing = String(error.message || error);
  }
  echo.close();
  console.log(JSON.stringify(seen));
}

main().catch((error) => {
  console.error(String(error && error.stack ? error.stack : error));
  process.exit(1);
});

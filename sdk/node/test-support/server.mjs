// What the tests share: the server under test (given by tests/integration/test_node_sdk.py in the
// environment), clients of it, a fetch that records each try, a port that refuses connections, and a
// loopback server for the faults flowpool cannot be made to show.
// It lives outside test/ because `node --test test/` runs every module there as a test file.
import http from 'node:http';
import net from 'node:net';

import { Flowpool } from '../index.mjs';

export const BASE_URL = process.env.FLOWPOOL_BASE_URL;
export const API_KEY = process.env.FLOWPOOL_API_KEY;
// An account allowed one run at a time, and one allowed one request a minute (each has `slow`).
export const LIMITED_KEY = process.env.FLOWPOOL_TEST_LIMITED_KEY;
export const RPM_KEY = process.env.FLOWPOOL_TEST_RPM_KEY;

/** node:test options that skip, saying why, a test that needs the server when none is given. */
export const withServer = BASE_URL && API_KEY && LIMITED_KEY && RPM_KEY
  ? {}
  : { skip: 'needs a flowpool server: run tests/integration/test_node_sdk.py, which starts one and sets its env' };

/** A client of the test server's main account, no retries unless asked. */
export function client(options = {}) {
  return new Flowpool({ baseURL: BASE_URL, apiKey: API_KEY, maxRetries: 0, timeout: 60_000, ...options });
}

/**
 * A fetch that records each try (its time, method, URL, headers, then its status and Retry-After) in
 * `tries`, then sends it with the platform's fetch: what the client sent, seen from outside it.
 */
export function recordingFetch(tries) {
  return async (url, init = {}) => {
    const entry = { at: performance.now(), url: String(url), method: init.method, headers: new Headers(init.headers) };
    tries.push(entry);
    const response = await fetch(url, init);
    entry.status = response.status;
    entry.retryAfter = response.headers.get('retry-after');
    return response;
  };
}

/** A loopback port nothing listens on (taken from the OS, then let go). */
export async function refusedPort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Poll `check()` until it is true (every 50 ms, up to `seconds`); fail saying `what`. */
export async function eventually(check, what, seconds = 20) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`not within ${seconds}s: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/**
 * A loopback HTTP server that answers as `answer(request, nth)` says, for the faults flowpool cannot be made
 * to show: `'drop'` closes the connection once the request has been read (a server that did the work, then
 * went away before answering), else `{status, headers, body}` is sent (JSON unless headers say otherwise).
 * `request` is `{method, path, key, body}` (`key` its Idempotency-Key, or null), `nth` counts the requests
 * with its method and path, this one included; `seen` records every request.
 */
export async function scriptedServer(answer) {
  const seen = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      const request = { method: req.method, path: req.url, key: req.headers['idempotency-key'] ?? null,
        body: Buffer.concat(chunks).toString('utf8') };
      seen.push(request);
      const nth = seen.filter((r) => r.method === request.method && r.path === request.path).length;
      const reply = answer(request, nth);
      if (reply === 'drop') {
        req.socket.destroy();
        return;
      }
      res.writeHead(reply.status ?? 200, { 'content-type': 'application/json', ...reply.headers });
      res.end(reply.body ?? '{}');
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    seen,
    close() {
      server.closeAllConnections();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

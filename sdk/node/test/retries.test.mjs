// Retries, timeouts and aborts, against the real server (and a loopback port that refuses connections).
import assert from 'node:assert/strict';
import test from 'node:test';

import {
  APIConnectionError, APITimeoutError, APIUserAbortError, Flowpool,
} from '../index.mjs';
import {
  API_KEY, LIMITED_KEY, client, recordingFetch, refusedPort, scriptedServer, withServer,
} from '../test-support/server.mjs';

const NO_SERVER = {}; // these tests need no server: the port refuses

/** The error a call throws; fails when it does not throw. */
function rejection(promise) {
  return promise.then(() => assert.fail('the call did not throw'), (err) => err);
}

test('a 429 is retried after its Retry-After with the same Idempotency-Key, and the server answers one run',
  withServer, async () => {
    const fp = client({ apiKey: LIMITED_KEY });
    const before = (await fp.workflows.runs('slow')).pagination.total;
    // It takes the account's one slot for 2 s.
    const holder = await fp.workflow.runs.create({ model: 'workflow:slow', input: { seconds: 2 }, cache: false });

    const tries = [];
    const response = await client({ apiKey: LIMITED_KEY, maxRetries: 20, fetch: recordingFetch(tries) })
      .workflow.completions.create({ model: 'workflow:slow', input: { seconds: 0 }, cache: false });

    assert.deepEqual(response.output, { slept: 0 });
    assert.ok(tries.length >= 2, 'the first try came while the slot was held');
    assert.deepEqual(tries.map((t) => t.status), [...tries.slice(0, -1).map(() => 429), 200]);
    const key = tries[0].headers.get('idempotency-key');
    assert.match(key, /^fp-[0-9a-f]{32}$/);
    for (const t of tries) assert.equal(t.headers.get('idempotency-key'), key);
    for (let i = 1; i < tries.length; i += 1) {
      assert.ok(tries[i].at - tries[i - 1].at >= Number(tries[i - 1].retryAfter) * 1000,
        `try ${i} came before the Retry-After of the one before`);
    }
    assert.equal((await fp.runs.get(holder.request_id, { wait: 30 })).status, 'succeeded');
    // One run for all the tries: the holder and this call's, no other.
    assert.equal((await fp.workflows.runs('slow')).pagination.total, before + 2);
    const again = await fp.workflow.completions.create({ model: 'workflow:slow', input: { seconds: 0 }, cache: false },
      { idempotencyKey: key });
    assert.equal(again.request_id, response.request_id);
  });

test('a refused connection is tried 1 + maxRetries times with one Idempotency-Key, then an APIConnectionError',
  NO_SERVER, async () => {
    const tries = [];
    const fp = new Flowpool({ baseURL: `http://127.0.0.1:${await refusedPort()}`, apiKey: 'fp_x', maxRetries: 2,
      fetch: recordingFetch(tries) });

    const error = await rejection(fp.workflow.completions.create({ model: 'workflow:echo' }));

    assert.ok(error instanceof APIConnectionError && !(error instanceof APITimeoutError), error.name);
    assert.equal(error.status, undefined);
    assert.match(error.message, /ECONNREFUSED/);
    assert.equal(tries.length, 3);
    assert.equal(new Set(tries.map((t) => t.headers.get('idempotency-key'))).size, 1);
    assert.ok(tries[1].at - tries[0].at >= 500 && tries[2].at - tries[1].at >= 1000, 'waits of 0.5 s, then 1 s');
  });

// An answer each call below takes as its success: an object with `data`, as the API's answers are.
const OK = { body: JSON.stringify({ object: 'chat.completion', request_id: 'req_1', data: { ok: true } }) };

test('a connection dropped after an upload, activate, validate or delete was sent is thrown, not sent again',
  NO_SERVER, async () => {
    // The server may have done each: sent again, a delete would answer 404 though it deleted.
    const server = await scriptedServer(() => 'drop');
    try {
      const fp = new Flowpool({ baseURL: server.url, apiKey: 'fp_x', maxRetries: 2 });
      const calls = [
        () => fp.workflows.upload({ workflow_ref_name: 'wf', script: 'def execute(ctx): pass' }),
        () => fp.workflows.activate('wf', { version: '1.0.0' }),
        () => fp.workflows.validate({ code: 'def execute(ctx): pass' }),
        () => fp.workflows.delete('wf'),
      ];
      for (const call of calls) {
        const error = await rejection(call());
        assert.ok(error instanceof APIConnectionError && !(error instanceof APITimeoutError), error.name);
      }
      assert.deepEqual(server.seen.map((r) => `${r.method} ${r.path}`), [
        'POST /api/v1/workflows/upload', 'POST /api/v1/workflows/wf/activate', 'POST /api/v1/workflows/validate',
        'DELETE /api/v1/workflows/wf',
      ]);
    } finally {
      await server.close();
    }
  });

test('a connection dropped under a GET, an invoke or a run start is sent again, a keyed call with its one key',
  NO_SERVER, async () => {
    const server = await scriptedServer((request, nth) => (nth === 1 ? 'drop' : OK));
    try {
      const fp = new Flowpool({ baseURL: server.url, apiKey: 'fp_x', maxRetries: 2 });
      assert.deepEqual(await fp.workflows.get('wf'), { ok: true });
      assert.equal((await fp.workflow.completions.create({ model: 'workflow:echo' })).request_id, 'req_1');
      assert.equal((await fp.workflow.runs.create({ model: 'workflow:echo' })).request_id, 'req_1');

      assert.deepEqual(server.seen.map((r) => `${r.method} ${r.path}`), [
        'GET /api/v1/workflows/wf', 'GET /api/v1/workflows/wf', 'POST /workflow/chat/completions',
        'POST /workflow/chat/completions', 'POST /api/v1/runs', 'POST /api/v1/runs',
      ]);
      const keys = server.seen.map((r) => r.key);
      assert.equal(keys[0], null);
      for (const i of [2, 4]) {
        assert.match(keys[i], /^fp-[0-9a-f]{32}$/);
        assert.equal(keys[i + 1], keys[i], 'the retry carries the first try\'s key');
      }
      assert.notEqual(keys[2], keys[4]);
    } finally {
      await server.close();
    }
  });

test('an answer marked x-should-retry is retried for any call, an upload and a delete included', NO_SERVER,
  async () => {
    // The server did nothing with a request it marks so (a 503, a 429 over a limit): sending it again is safe.
    const busy = { status: 503, headers: { 'x-should-retry': 'true', 'retry-after': '0' },
      body: JSON.stringify({ error: { type: 'service_unavailable', message: 'busy' } }) };
    const server = await scriptedServer((request, nth) => (nth === 1 ? busy : OK));
    try {
      const fp = new Flowpool({ baseURL: server.url, apiKey: 'fp_x', maxRetries: 2 });
      assert.deepEqual(await fp.workflows.upload({ workflow_ref_name: 'wf', script: 'x' }), { ok: true });
      assert.deepEqual(await fp.workflows.delete('wf'), { ok: true });
      assert.deepEqual(server.seen.map((r) => `${r.method} ${r.path}`), [
        'POST /api/v1/workflows/upload', 'POST /api/v1/workflows/upload', 'DELETE /api/v1/workflows/wf',
        'DELETE /api/v1/workflows/wf',
      ]);
    } finally {
      await server.close();
    }
  });

test('each call gets its own Idempotency-Key unless given one', NO_SERVER, async () => {
  const tries = [];
  const fp = new Flowpool({ baseURL: `http://127.0.0.1:${await refusedPort()}`, maxRetries: 0,
    fetch: recordingFetch(tries) });
  await rejection(fp.workflow.completions.create({ model: 'workflow:echo' }));
  await rejection(fp.workflow.completions.create({ model: 'workflow:echo' }));
  await rejection(fp.workflow.runs.create({ model: 'workflow:echo' }, { idempotencyKey: 'mine-1' }));
  const keys = tries.map((t) => t.headers.get('idempotency-key'));
  assert.notEqual(keys[0], keys[1]);
  assert.equal(keys[2], 'mine-1');
});

test('a call past its timeout is an APITimeoutError and is not tried again', withServer, async () => {
  const tries = [];
  const fp = client({ maxRetries: 2, fetch: recordingFetch(tries) });

  const error = await rejection(fp.workflow.completions.create(
    { model: 'workflow:slow', input: { seconds: 3 }, cache: false }, { timeout: 300 }));

  assert.ok(error instanceof APITimeoutError, error.name);
  assert.ok(error instanceof APIConnectionError);
  assert.equal(tries.length, 1);
});

test('an aborted signal stops a call before it is sent', withServer, async () => {
  const tries = [];
  const controller = new AbortController();
  controller.abort();
  const error = await rejection(client({ fetch: recordingFetch(tries) }).workflow.completions.create(
    { model: 'workflow:echo' }, { signal: controller.signal }));
  assert.ok(error instanceof APIUserAbortError, error.name);
  assert.equal(tries.length, 0);
});

test('aborting while the answer is awaited is an APIUserAbortError, not a timeout, and is not retried',
  withServer, async () => {
    const tries = [];
    const signal = AbortSignal.timeout(300); // the caller's own signal, fired by time
    const error = await rejection(client({ maxRetries: 2, fetch: recordingFetch(tries) }).workflow.completions.create(
      { model: 'workflow:slow', input: { seconds: 3 }, cache: false }, { signal }));
    assert.ok(error instanceof APIUserAbortError, error.name);
    assert.equal(tries.length, 1);
  });

test('aborting ends the wait between two tries', NO_SERVER, async () => {
  const tries = [];
  const fp = new Flowpool({ baseURL: `http://127.0.0.1:${await refusedPort()}`, maxRetries: 5,
    fetch: recordingFetch(tries) });
  const controller = new AbortController();
  setTimeout(() => controller.abort(), 200); // within the 0.5 s wait after the first try
  const error = await rejection(fp.workflow.completions.create({ model: 'workflow:echo' },
    { signal: controller.signal }));
  assert.ok(error instanceof APIUserAbortError, error.name);
  assert.equal(tries.length, 1);
});

test('aborting a stream as it goes throws APIUserAbortError from its iteration', withServer, async () => {
  const controller = new AbortController();
  const seen = [];
  const error = await rejection((async () => {
    for await (const chunk of client().workflow.completions.create(
      { model: 'workflow:emits-then-sleeps', input: { seconds: 5 }, cache: false, stream: true },
      { signal: controller.signal },
    )) {
      seen.push(chunk.type);
      controller.abort(); // after the first chunk, while the run sleeps
    }
  })());
  assert.ok(error instanceof APIUserAbortError, error.name);
  assert.deepEqual(seen, ['started']);
});

test("a stream's own controller aborts it too", withServer, async () => {
  const stream = await client({ apiKey: API_KEY }).workflow.completions.create(
    { model: 'workflow:emits-then-sleeps', input: { seconds: 5 }, cache: false, stream: true });
  const seen = [];
  const error = await rejection((async () => {
    for await (const chunk of stream) {
      seen.push(chunk.type);
      stream.controller.abort();
    }
  })());
  assert.ok(error instanceof APIUserAbortError, error.name);
  assert.deepEqual(seen, ['started']);
});

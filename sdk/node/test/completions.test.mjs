// Invoking a workflow: the completion, the env fallbacks, Maitai, and streams, against the real server.
import assert from 'node:assert/strict';
import test from 'node:test';

import Flowpool, { InternalServerError, Maitai } from '../index.mjs';
import {
  API_KEY, BASE_URL, client, recordingFetch, refusedPort, withServer,
} from '../test-support/server.mjs';

/** Run `body` with these environment variables set (undefined: unset), then put them back. */
async function withEnv(vars, body) {
  const saved = Object.fromEntries(Object.keys(vars).map((name) => [name, process.env[name]]));
  const apply = (values) => {
    for (const [name, value] of Object.entries(values)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  };
  apply(vars);
  try {
    return await body();
  } finally {
    apply(saved);
  }
}

test('a completion answers the chat.completion carrying the script output', withServer, async () => {
  const response = await client().workflow.completions.create({
    model: 'workflow:echo', messages: [{ role: 'user', content: 'hello' }], input: { n: 1 }, session_id: 'sess-node',
  });

  assert.equal(response.object, 'chat.completion');
  assert.equal(response.model, 'workflow:echo');
  assert.deepEqual(response.output, { input: { n: 1 }, said: 'hello', session_id: 'sess-node' });
  assert.equal(response.choices[0].message.role, 'assistant');
  assert.deepEqual(JSON.parse(response.choices[0].message.content), response.output);
  assert.match(response.request_id, /^req_/);
  assert.equal(response.session_id, 'sess-node');
});

test('new Flowpool() takes its key from FLOWPOOL_API_KEY and its URL from FLOWPOOL_BASE_URL or FLOWPOOL_API_URL',
  withServer, async () => {
    const fromBase = new Flowpool();
    assert.equal(fromBase.baseURL, BASE_URL);
    assert.equal((await fromBase.workflow.completions.create({ model: 'workflow:echo', input: 1 })).output.input, 1);

    await withEnv({ FLOWPOOL_BASE_URL: undefined, FLOWPOOL_API_URL: `${BASE_URL}/` }, async () => {
      const fromApiUrl = new Flowpool();
      assert.equal(fromApiUrl.baseURL, BASE_URL); // its trailing slash dropped
      const response = await fromApiUrl.workflow.completions.create({ model: 'workflow:echo', input: 2 });
      assert.equal(response.output.input, 2);
    });
    await withEnv({ FLOWPOOL_BASE_URL: undefined, FLOWPOOL_API_URL: undefined }, async () => {
      assert.equal(new Flowpool().baseURL, 'http://127.0.0.1:8080');
    });
  });

test('Maitai reads MAITAI_API_KEY and MAITAI_BASE_URL first and sends the key as X-Maitai-Api-Key', withServer,
  async () => {
    const refused = `http://127.0.0.1:${await refusedPort()}`;
    // The FLOWPOOL_* values would fail: the call only works if the MAITAI_* ones come first.
    await withEnv({ MAITAI_API_KEY: API_KEY, MAITAI_BASE_URL: BASE_URL, FLOWPOOL_API_KEY: 'fp_wrong',
      FLOWPOOL_BASE_URL: refused }, async () => {
      // The seed's call, its import line aside.
      const maitai = new Maitai();
      const response = await maitai.workflow.completions.create({
        model: 'workflow:echo', messages: [{ role: 'user', content: 'from maitai' }],
      });
      assert.equal(response.output.said, 'from maitai');

      const tries = [];
      const recorded = new Maitai({ fetch: recordingFetch(tries) });
      await recorded.workflow.completions.create({ model: 'workflow:echo', input: {} });
      assert.equal(tries[0].headers.get('x-maitai-api-key'), API_KEY);
      assert.equal(tries[0].headers.get('x-api-key'), null);
      assert.equal(tries[0].status, 200);
    });
  });

test("a base URL ending in /api/v1, as Maitai's CLI writes MAITAI_BASE_URL, is taken as the API's root", withServer,
  async () => {
    await withEnv({ MAITAI_API_KEY: API_KEY, MAITAI_BASE_URL: `${BASE_URL}/api/v1` }, async () => {
      const maitai = new Maitai();
      assert.equal(maitai.baseURL, BASE_URL);
      const response = await maitai.workflow.completions.create({ model: 'workflow:echo', input: 'v1' });
      assert.equal(response.output.input, 'v1');
    });
    const fp = client({ baseURL: `${BASE_URL}/api/v1/` });
    assert.equal(fp.baseURL, BASE_URL);
    assert.equal((await fp.workflows.get('echo')).workflow_ref_name, 'echo');
  });

test('a stream yields each emitted chunk with its type and content in order, then the completion with choices',
  withServer, async () => {
    const stream = await client().workflow.completions.create({
      model: 'workflow:emits', input: { steps: ['fetch', 'parse'] }, stream: true,
    });
    const chunks = [];
    let final;
    for await (const chunk of stream) {
      // As the seed's Node snippet reads a stream: chunks by .type/.content, the end by .choices.
      if (chunk.choices) final = chunk;
      else chunks.push([chunk.type, chunk.content]);
    }

    assert.deepEqual(chunks, [['step', 'fetch'], ['step', 'parse'], ['progress', { done: true }]]);
    assert.equal(final.object, 'chat.completion');
    assert.deepEqual(JSON.parse(final.choices[0].message.content), { steps: 2 });
    assert.deepEqual(final.output, { steps: 2 });
    assert.equal(stream.requestId, final.request_id);
  });

test('a stream can be iterated straight from create, and keep-alive comments between events are passed over',
  withServer, async () => {
    const events = [];
    // The run sleeps 1 s after its chunk: the server sends keep-alive comments meanwhile (every 0.3 s here).
    for await (const event of client().workflow.completions.create({
      model: 'workflow:emits-then-sleeps', input: { seconds: 1 }, cache: false, stream: true,
    })) {
      events.push(event.object);
    }
    assert.deepEqual(events, ['workflow.chunk', 'chat.completion']);
  });

test('an error event in a stream is thrown as its typed error after the chunks before it', withServer, async () => {
  const chunks = [];
  await assert.rejects(async () => {
    const stream = client().workflow.completions.create({ model: 'workflow:fails', input: {}, stream: true });
    for await (const chunk of stream) {
      chunks.push(chunk);
    }
  }, (error) => {
    assert.ok(error instanceof InternalServerError);
    assert.equal(error.status, 500);
    assert.equal(error.type, 'script_error');
    assert.equal(error.requestId, chunks[0].request_id);
    return true;
  });
  assert.deepEqual(chunks.map((c) => [c.type, c.content]), [['step', 1]]);
});

// The event-stream reader on its own (no server): every way the format may split and end its lines; then a
// client's Stream over a loopback server, for what flowpool does not send: a stream cut short.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import test from 'node:test';

import { APIConnectionError, APITimeoutError, Flowpool } from '../index.mjs';
import { scriptedServer } from '../test-support/server.mjs';

const { events } = createRequire(import.meta.url)('../lib/sse.cjs');

/** The events read from `text` as it arrives in pieces of `size` bytes. */
async function read(text, size) {
  const bytes = new TextEncoder().encode(text);
  async function* pieces() {
    for (let i = 0; i < bytes.length; i += size) yield bytes.slice(i, i + size);
  }
  const seen = [];
  for await (const event of events(pieces())) seen.push(event);
  return seen;
}

const STREAM = [
  ': keep-alive',
  'id: 1-0',
  'data: {"a":',
  'data: 1}',
  '',
  ': keep-alive',
  '',
  'event: log',
  'data:{"b":"é"}',
  '',
  'data',
  '',
  'data: [DONE]',
  '',
  'data: never ended',
].join('\n');

const EXPECTED = [
  { event: 'message', data: '{"a":\n1}', id: '1-0' },
  { event: 'log', data: '{"b":"é"}', id: '1-0' },
  { event: 'message', data: '', id: '1-0' },
  { event: 'message', data: '[DONE]', id: '1-0' },
];

test('events join their data lines, skip comments, and drop an event the stream ends inside', async () => {
  assert.deepEqual(await read(STREAM, 1 << 16), EXPECTED);
});

test('lines may end with CRLF or CR and split anywhere, a CRLF across two reads included', async () => {
  for (const end of ['\r\n', '\r']) {
    const text = STREAM.replaceAll('\n', end);
    for (const size of [1, 2, 3, 7]) {
      assert.deepEqual(await read(text, size), EXPECTED, `lines ending ${JSON.stringify(end)}, ${size}-byte reads`);
    }
  }
});

test('U+2028 and U+2029 inside an event are text, not line ends, even split across reads', async () => {
  // JSON leaves both unescaped in its strings: a reader splitting lines on them would cut the event in two.
  const data = JSON.stringify({ content: 'a\u2028b\u2029c' });
  for (const size of [1, 2, 1 << 16]) {
    assert.deepEqual(await read(`data: ${data}\n\ndata: [DONE]\n\n`, size),
      [{ event: 'message', data, id: '' }, { event: 'message', data: '[DONE]', id: '' }], `${size}-byte reads`);
  }
});

/** The events a client's stream of a run yields from a server answering `body`, and what it threw. */
async function streamOf(body) {
  const server = await scriptedServer(() => ({ headers: { 'content-type': 'text/event-stream' }, body }));
  const seen = [];
  try {
    const fp = new Flowpool({ baseURL: server.url, apiKey: 'fp_x', maxRetries: 0 });
    for await (const event of fp.runs.stream('req_1')) seen.push(event);
    return { seen, error: null };
  } catch (error) {
    return { seen, error };
  } finally {
    await server.close();
  }
}

const CHUNK = { object: 'workflow.chunk', type: 'line', content: 'one\u2028two', index: 0, request_id: 'req_1' };

test('a chunk whose content holds U+2028 comes through whole', async () => {
  const { seen, error } = await streamOf(`data: ${JSON.stringify(CHUNK)}\n\ndata: [DONE]\n\n`);
  assert.equal(error, null);
  assert.deepEqual(seen, [CHUNK]);
});

test('a stream that ends without its [DONE] throws an APIConnectionError after the events before', async () => {
  // The connection closed mid-run (a proxy's cut, a server gone): the run's end was never seen.
  const { seen, error } = await streamOf(`data: ${JSON.stringify(CHUNK)}\n\n`);
  assert.deepEqual(seen, [CHUNK]);
  assert.ok(error instanceof APIConnectionError && !(error instanceof APITimeoutError), error && error.name);
  assert.match(error.message, /ended before its \[DONE\]/);
});

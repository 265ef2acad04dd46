// The event-stream reader on its own (no server): every way the format may split and end its lines.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import test from 'node:test';

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

'use strict';
/**
 * Reading a server-sent event stream (the WHATWG "event stream" format), as flowpool answers a stream:
 * lines end with CRLF, LF or CR; a line starting with ":" is a comment (the server's keep-alives); "data:"
 * lines of one event are joined with "\n"; a blank line ends the event; an event not ended when the stream
 * ends is dropped, as a browser's EventSource drops it.
 */

/**
 * The lines of a byte stream, decoded as UTF-8, without their ends.
 * @param {AsyncIterable<Uint8Array>|ReadableStream<Uint8Array>} body
 * @returns {AsyncGenerator<string>}
 */
async function* lines(body) {
  const decoder = new TextDecoder('utf-8');
  let buffer = '';
  for await (const bytes of iterate(body)) {
    buffer += decoder.decode(bytes, { stream: true });
    let start = 0;
    for (;;) {
      const cr = buffer.indexOf('\r', start);
      const lf = buffer.indexOf('\n', start);
      if (cr === -1 && lf === -1) break;
      if (cr !== -1 && (lf === -1 || cr < lf)) {
        // A CR that ends the buffer may be the first half of a CRLF split across two reads.
        if (cr === buffer.length - 1) break;
        yield buffer.slice(start, cr);
        start = buffer[cr + 1] === '\n' ? cr + 2 : cr + 1;
      } else {
        yield buffer.slice(start, lf);
        start = lf + 1;
      }
    }
    buffer = buffer.slice(start);
  }
  buffer += decoder.decode();
  // What is left has no line end: a CR alone ends its line; text without one is no full line.
  if (buffer.endsWith('\r')) yield buffer.slice(0, -1);
}

/** The chunks of a web ReadableStream (Node 18's is not async-iterable everywhere) or an async iterable. */
async function* iterate(body) {
  if (typeof body.getReader !== 'function') {
    yield* body;
    return;
  }
  const reader = body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      yield value;
    }
  } finally {
    // Stopped early (the caller broke out, or an error): let go of the connection.
    reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}

/**
 * The events of an event stream: `{event, data, id}`, `event` "message" unless named.
 * @param {AsyncIterable<Uint8Array>|ReadableStream<Uint8Array>} body
 * @returns {AsyncGenerator<{event: string, data: string, id: string}>}
 */
async function* events(body) {
  let data = [];
  let event = '';
  let id = '';
  for await (const line of lines(body)) {
    if (line === '') {
      if (data.length) yield { event: event || 'message', data: data.join('\n'), id };
      data = [];
      event = '';
      continue;
    }
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'event') event = value;
    else if (field === 'id' && !value.includes('\0')) id = value;
  }
}

module.exports = { events, lines };

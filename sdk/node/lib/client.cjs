'use strict';
/**
 * The client: `new Flowpool({apiKey, baseURL})`, its resources, retries, timeouts and aborts.
 *
 * An answer the server marks `x-should-retry: true` (a 429 over a limit, a 503: it did nothing) is retried,
 * whatever the call, after its `Retry-After` (raised at once when that is over 10 s: a spent budget, not
 * worth waiting for here), else after 0.5 s doubling. A connection that fails before an answer is retried
 * only when sending the call twice does no harm: a GET (or HEAD), or a call that carries an
 * `Idempotency-Key` (every invoke and run start has one, a new one per call unless given, and the server
 * answers every try of one key from one run). An upload, an activation, a validation or a delete has none:
 * the server may have done it before the connection dropped, so the error is the caller's to judge.
 * A run's own errors (500, 408) are never retried, nor is a stream once its answer has started.
 */
const { randomUUID } = require('node:crypto');
const {
  APIConnectionError, APIError, APITimeoutError, APIUserAbortError, errorFor,
} = require('./errors.cjs');
const { events } = require('./sse.cjs');

const DEFAULT_BASE_URL = 'http://127.0.0.1:8080';
const DEFAULT_TIMEOUT = 660_000; // ms: over the longest run a server lets go (10 min), as the Python client's
const MAX_RETRY_WAIT = 10_000; // ms: the longest Retry-After worth waiting for inside one call
const VERSION = '0.1.0';

/** The first of these environment variables that is set and not empty. */
function fromEnv(names) {
  const env = typeof process !== 'undefined' && process.env ? process.env : {};
  for (const name of names) {
    const value = env[name];
    if (value !== undefined && value.trim() !== '') return value.trim();
  }
  return undefined;
}

/** The API's root URL, whence every route starts: no trailing slash, nor the `/api/v1` Maitai's CLI ends it with. */
function rootURL(url) {
  return String(url).replace(/\/+$/, '').replace(/\/api\/v1$/, '');
}

class Flowpool {
  /** The environment variables read for options not given, first set first. */
  static get env() {
    return { apiKey: ['FLOWPOOL_API_KEY'], baseURL: ['FLOWPOOL_BASE_URL', 'FLOWPOOL_API_URL'] };
  }

  /** The header that carries the key. */
  static get keyHeader() {
    return 'x-api-key';
  }

  /**
   * @param {object} [options]
   * @param {string|null} [options.apiKey] the account's key; default FLOWPOOL_API_KEY
   * @param {string} [options.baseURL] the API's root URL (a trailing /api/v1 is dropped); default
   *   FLOWPOOL_BASE_URL, FLOWPOOL_API_URL, then 127.0.0.1:8080
   * @param {number} [options.timeout] ms one try may take (a stream: until its answer starts)
   * @param {number} [options.maxRetries] tries after the first, when it is safe (default 2)
   * @param {Record<string, string>} [options.defaultHeaders] headers sent with every request
   * @param {typeof fetch} [options.fetch] the fetch to use (default the platform's)
   */
  constructor({ apiKey, baseURL, timeout, maxRetries, defaultHeaders, fetch: fetchImpl } = {}) {
    const env = this.constructor.env;
    this.apiKey = apiKey ?? fromEnv(env.apiKey) ?? null;
    this.baseURL = rootURL(baseURL ?? fromEnv(env.baseURL) ?? DEFAULT_BASE_URL);
    this.timeout = timeout ?? DEFAULT_TIMEOUT;
    this.maxRetries = maxRetries ?? 2;
    this.defaultHeaders = { ...defaultHeaders };
    this.fetch = fetchImpl ?? globalThis.fetch;
    if (typeof this.fetch !== 'function') {
      throw new TypeError('no fetch: this platform has none (Node 18 or later has one); pass options.fetch');
    }
    this.workflow = new Workflow(this);
    this.workflows = new Workflows(this);
    this.runs = new Runs(this);
  }

  /** A client like this one with some options changed. */
  withOptions(options = {}) {
    return new this.constructor({
      apiKey: this.apiKey, baseURL: this.baseURL, timeout: this.timeout, maxRetries: this.maxRetries,
      fetch: this.fetch, ...options, defaultHeaders: { ...this.defaultHeaders, ...options.defaultHeaders },
    });
  }

  /** The headers every request carries: the key under this client's header, then the caller's defaults. */
  _headers() {
    const headers = { accept: 'application/json', 'user-agent': `flowpool-node/${VERSION}` };
    if (this.apiKey) headers[this.constructor.keyHeader] = this.apiKey;
    return { ...headers, ...this.defaultHeaders };
  }

  _url(path, query) {
    const url = new URL(this.baseURL + path);
    for (const [name, value] of Object.entries(query ?? {})) {
      if (value !== undefined && value !== null) url.searchParams.set(name, String(value));
    }
    return url.toString();
  }

  /** A request answered as its JSON object; an error status thrown as its APIError. */
  async _json(method, path, { query, body, headers, options = {} } = {}) {
    const { response, call } = await this._send(method, path, { query, body, headers, options });
    let text;
    try {
      text = await response.text();
    } catch (err) {
      throw call.errorOf(err);
    } finally {
      call.done();
    }
    return decode(response, text);
  }

  /** A request answered as server-sent events, as a {@link Stream}. */
  async _stream(method, path, { query, body, headers, options = {} } = {}) {
    const { response, call } = await this._send(method, path, {
      query, body, headers: { ...headers, accept: 'text/event-stream' }, options,
    });
    const type = response.headers.get('content-type') ?? '';
    if (response.status >= 400 || !type.startsWith('text/event-stream')) {
      // An error before the stream started (or an answer that is no stream): one JSON body, thrown or given.
      let text;
      try {
        text = await response.text();
      } catch (err) {
        throw call.errorOf(err);
      } finally {
        call.done();
      }
      return Stream.of([decode(response, text)], response);
    }
    call.started(); // the timeout was for the answer to start; a stream takes as long as its run
    return new Stream(response, call);
  }

  /**
   * Send a request, again while it is safe: the answer says so (`x-should-retry`), or no answer came to a
   * call that may be sent twice (see {@link replayable}).
   */
  async _send(method, path, { query, body, headers, options }) {
    const url = this._url(path, query);
    const sent = { ...this._headers(), ...headers, ...options.headers };
    let payload;
    if (body !== undefined) {
      payload = JSON.stringify(body);
      sent['content-type'] = 'application/json';
    }
    const resend = replayable(method, sent);
    const maxRetries = options.maxRetries ?? this.maxRetries;
    const timeout = options.timeout ?? this.timeout;
    for (let attempt = 0; ; attempt += 1) {
      const last = attempt >= maxRetries;
      if (options.signal && options.signal.aborted) throw new APIUserAbortError();
      const call = new Call(options.signal, timeout);
      let response;
      try {
        response = await this.fetch(url, { method, headers: sent, body: payload, signal: call.signal });
      } catch (err) {
        call.done();
        const error = call.errorOf(err);
        // A timeout is not tried again: the caller's limit is for the whole call to keep.
        if (last || !resend || error.constructor !== APIConnectionError) throw error;
        await sleep(backoff(attempt), options.signal);
        continue;
      }
      if (!last && response.status >= 400 && response.headers.get('x-should-retry') === 'true') {
        const wait = retryWait(attempt, response.headers.get('retry-after'));
        if (wait !== null) {
          call.done();
          await response.body?.cancel().catch(() => {});
          await sleep(wait, options.signal);
          continue;
        }
      }
      return { response, call };
    }
  }
}

/** The same client for code written against Maitai: MAITAI_* first, the key sent as X-Maitai-Api-Key. */
class Maitai extends Flowpool {
  static get env() {
    return {
      apiKey: ['MAITAI_API_KEY', 'FLOWPOOL_API_KEY'],
      baseURL: ['MAITAI_BASE_URL', 'FLOWPOOL_BASE_URL', 'FLOWPOOL_API_URL'],
    };
  }

  static get keyHeader() {
    return 'X-Maitai-Api-Key';
  }
}

/** One try's signal: aborted by the caller's signal or by the timeout, remembering which. */
class Call {
  constructor(signal, timeout) {
    this.controller = new AbortController();
    this.signal = this.controller.signal;
    this.reason = null;
    this.timeout = timeout;
    this.userSignal = signal;
    if (signal) {
      this.onAbort = () => this.abort('user');
      if (signal.aborted) this.abort('user');
      else signal.addEventListener('abort', this.onAbort, { once: true });
    }
    if (timeout !== null && timeout !== undefined && Number.isFinite(timeout)) {
      this.timer = setTimeout(() => this.abort('timeout'), timeout);
    }
  }

  abort(reason) {
    if (this.reason) return;
    this.reason = reason;
    this.controller.abort();
  }

  /** The answer has started: the timeout no longer applies, the caller's signal still does. */
  started() {
    clearTimeout(this.timer);
  }

  /** The try is over: nothing of it is left listening. */
  done() {
    clearTimeout(this.timer);
    if (this.userSignal && this.onAbort) this.userSignal.removeEventListener('abort', this.onAbort);
  }

  /** What an error of fetch or of reading the body means for the caller. */
  errorOf(err) {
    if (err instanceof APIError) return err;
    if (this.reason === 'user') return new APIUserAbortError({ cause: err });
    if (this.reason === 'timeout') {
      return new APITimeoutError({ message: `Request timed out: no answer within ${this.timeout} ms.`, cause: err });
    }
    const why = err && err.cause && err.cause.message ? err.cause.message : err && err.message;
    return new APIConnectionError({ message: `Connection error: ${why}`, cause: err });
  }
}

/**
 * Whether a call may be sent again after its connection failed, when the server may have acted on it: a GET
 * or HEAD reads only, and a call with an Idempotency-Key is answered from its first try's run.
 */
function replayable(method, headers) {
  if (method === 'GET' || method === 'HEAD') return true;
  return Object.entries(headers).some(([name, value]) => name.toLowerCase() === 'idempotency-key' && value);
}

/** ms before the next try after a failed connection: 0.5 s doubling, at most 10 s. */
function backoff(attempt) {
  return Math.min(500 * 2 ** attempt, MAX_RETRY_WAIT);
}

/** ms before the next try of an answer that may be retried: its Retry-After, else backoff; null: too long. */
function retryWait(attempt, retryAfter) {
  if (retryAfter === null || retryAfter.trim() === '') return backoff(attempt);
  let ms = Number(retryAfter) * 1000;
  if (Number.isNaN(ms)) {
    const at = Date.parse(retryAfter); // the HTTP-date form
    if (Number.isNaN(at)) return backoff(attempt);
    ms = at - Date.now();
  }
  ms = Math.max(ms, 0);
  return ms <= MAX_RETRY_WAIT ? ms : null;
}

/** Wait `ms`; the caller's signal ends the wait with APIUserAbortError. */
function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) {
      reject(new APIUserAbortError());
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(new APIUserAbortError());
    };
    const timer = setTimeout(() => {
      if (signal) signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
  });
}

/** The JSON object of an answer; an error status thrown as its APIError, and so is a body that is no object. */
function decode(response, text) {
  let body = text;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: kept as text for the error to show
  }
  if (response.status >= 400) throw errorFor(response.status, body, response.headers);
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    const kind = response.headers.get('content-type') || 'no Content-Type';
    const start = (typeof body === 'string' ? body : JSON.stringify(body)).slice(0, 200);
    throw new APIError(response.status, { error: {
      type: 'invalid_response',
      message: `${response.url} answered ${response.status} with a body that is not a JSON object (${kind}), `
        + `not as flowpool's API answers: ${JSON.stringify(start)}`,
    } }, response.headers);
  }
  return body;
}

/**
 * The events of a stream, as an async iterable: each `workflow.chunk` (`type`, `content`, `index`), then
 * the `chat.completion` (`choices`); an error event is thrown as its APIError. Iterate it once.
 */
class Stream {
  constructor(response, call, values) {
    this.response = response;
    this.call = call;
    this.values = values;
    /** Aborting it ends the stream (the iteration throws APIUserAbortError). */
    this.controller = { abort: () => call && call.abort('user') };
    this.requestId = response ? response.headers.get('x-request-id') ?? undefined : undefined;
  }

  static of(values, response) {
    return new Stream(response, null, values);
  }

  async* [Symbol.asyncIterator]() {
    if (this.values) {
      yield* this.values;
      return;
    }
    if (this.used) throw new TypeError('a Stream can be iterated only once');
    this.used = true;
    const { response, call } = this;
    try {
      for await (const event of events(response.body)) {
        if (event.data === '[DONE]') return;
        let value;
        try {
          value = JSON.parse(event.data);
        } catch {
          throw new APIError(response.status, { error: {
            type: 'invalid_response', message: `an event that is not JSON: ${event.data.slice(0, 200)}`,
          } }, response.headers);
        }
        if (value && typeof value === 'object' && value.error && typeof value.error === 'object') {
          const code = value.error.code;
          throw errorFor(Number.isInteger(code) ? code : 500, value, response.headers);
        }
        // The wire's "choices": [] on a chunk is for OpenAI clients; here only the completion has choices.
        if (value && value.object === 'workflow.chunk' && Array.isArray(value.choices) && !value.choices.length) {
          delete value.choices;
        }
        yield value;
      }
      throw new APIConnectionError({ message: 'Connection error: the stream ended before its [DONE].' });
    } catch (err) {
      throw call.errorOf(err);
    } finally {
      call.done();
    }
  }
}

/** A promise of a Stream that can also be iterated at once: `for await (const c of create({stream: true}))`. */
function streaming(promise) {
  promise[Symbol.asyncIterator] = async function* iterate() {
    yield* await promise;
  };
  return promise;
}

function idempotencyKey(options) {
  return options.idempotencyKey ?? `fp-${randomUUID().replace(/-/g, '')}`;
}

class Completions {
  constructor(client) {
    this._client = client;
  }

  /** Invoke a workflow (`model: "workflow:<name>"`): the chat.completion, or with `stream: true` its events. */
  create(params, options = {}) {
    const headers = { 'Idempotency-Key': idempotencyKey(options) };
    if (params && params.stream) {
      return streaming(this._client._stream('POST', '/workflow/chat/completions', { body: params, headers, options }));
    }
    return this._client._json('POST', '/workflow/chat/completions', { body: params, headers, options });
  }
}

class Runs {
  constructor(client) {
    this._client = client;
  }

  /** Everything kept of a run; with `wait` (seconds), answered once it ends or after `wait`. */
  async get(requestId, params = {}, options = {}) {
    const { wait } = params;
    const timeout = options.timeout ?? (wait ? Math.max(this._client.timeout, wait * 1000 + 30_000) : undefined);
    const answer = await this._client._json('GET', `/api/v1/runs/${encodeURIComponent(requestId)}`, {
      query: { wait }, options: { ...options, timeout },
    });
    return answer.data;
  }

  /** Follow a run from its start: its chunks (and with `logs: true` its log lines), then its completion. */
  stream(requestId, params = {}, options = {}) {
    return streaming(this._client._stream('GET', `/api/v1/runs/${encodeURIComponent(requestId)}/stream`, {
      query: { logs: params.logs ? 'true' : undefined }, options,
    }));
  }
}

class WorkflowRuns extends Runs {
  /** Start a run without waiting: its `request_id`, `status`, `status_url` and `stream_url`. */
  create(params, options = {}) {
    const headers = { 'Idempotency-Key': idempotencyKey(options) };
    return this._client._json('POST', '/api/v1/runs', { body: params, headers, options });
  }
}

class Workflow {
  constructor(client) {
    this.completions = new Completions(client);
    this.runs = new WorkflowRuns(client);
  }
}

/** `accessories` as the API takes them: `[{key, content_base64}]`, from that or from `{key: text or bytes}`. */
function accessoriesOf(accessories) {
  if (accessories === undefined || Array.isArray(accessories)) return accessories;
  return Object.entries(accessories).map(([key, content]) => ({
    key, content_base64: Buffer.from(content).toString('base64'),
  }));
}

function workflowPath(ref, ...rest) {
  return ['/api/v1/workflows', ...[ref, ...rest].map((part) => encodeURIComponent(part))].join('/');
}

class Workflows {
  constructor(client) {
    this._client = client;
  }

  /** Upload a script as a workflow's new version (`workflow_ref_name`, `script`, and the upload's fields). */
  async upload(params, options = {}) {
    const body = { ...params };
    if (body.accessories !== undefined) body.accessories = accessoriesOf(body.accessories);
    return (await this._client._json('POST', '/api/v1/workflows/upload', { body, options })).data;
  }

  /** Workflow `ref` and its active version. */
  async get(ref, options = {}) {
    return (await this._client._json('GET', workflowPath(ref), { options })).data;
  }

  /** The account's workflows, a page as the API answers it: `{data, pagination: {total, offset, limit}}`. */
  list(params = {}, options = {}) {
    return this._client._json('GET', '/api/v1/workflows', { query: params, options });
  }

  /** The versions of workflow `ref`, a page. */
  versions(ref, params = {}, options = {}) {
    return this._client._json('GET', workflowPath(ref, 'versions'), { query: params, options });
  }

  /** Make `version` the one that invocations of `ref` run. */
  async activate(ref, params, options = {}) {
    return (await this._client._json('POST', workflowPath(ref, 'activate'), { body: params, options })).data;
  }

  /** The latest runs of workflow `ref`, newest first, a page. */
  runs(ref, params = {}, options = {}) {
    return this._client._json('GET', workflowPath(ref, 'runs'), { query: params, options });
  }

  /** Check a script as an upload would, without storing it: `{ok, errors}`. */
  async validate(params, options = {}) {
    return (await this._client._json('POST', '/api/v1/workflows/validate', { body: params, options })).data;
  }

  /** Delete workflow `ref` and its versions. */
  async delete(ref, options = {}) {
    return (await this._client._json('DELETE', workflowPath(ref), { options })).data;
  }
}

module.exports = { Flowpool, Maitai, Stream, DEFAULT_BASE_URL, VERSION };

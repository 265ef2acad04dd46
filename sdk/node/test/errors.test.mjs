// Each error status of the real server, thrown as its own class with what the API said.
import assert from 'node:assert/strict';
import test from 'node:test';

import {
  APIError, AuthenticationError, BadRequestError, InternalServerError, NotFoundError, PayloadTooLargeError,
  RateLimitError, UnprocessableEntityError, WorkflowTimeoutError,
} from '../index.mjs';
import {
  LIMITED_KEY, RPM_KEY, client, eventually, recordingFetch, withServer,
} from '../test-support/server.mjs';

/** The error a call throws, checked to be an APIError of class `Cls` with `status`. */
async function thrown(promise, Cls, status) {
  const error = await promise.then(() => assert.fail('the call did not throw'), (err) => err);
  assert.ok(error instanceof Cls, `${error.name} (${error.message}) is no ${Cls.name}`);
  assert.ok(error instanceof APIError && error instanceof Error);
  assert.equal(error.name, Cls.name);
  assert.equal(error.status, status);
  assert.equal(error.code, status);
  return error;
}

test('bad input is a BadRequestError naming the field', withServer, async () => {
  const error = await thrown(client().workflow.completions.create({ model: 'workflow:echo', messages: 'hi' }),
    BadRequestError, 400);
  assert.equal(error.type, 'invalid_request_error');
  assert.match(error.message, /^400 invalid_request_error: messages: /);
  assert.match(error.error.message, /^messages: /);
  assert.equal(error.headers.get('x-should-retry'), 'false');
});

test('a bad key is an AuthenticationError', withServer, async () => {
  const error = await thrown(client({ apiKey: 'fp_not-a-key' }).workflow.completions.create({ model: 'workflow:echo' }),
    AuthenticationError, 401);
  assert.equal(error.type, 'authentication_error');
  assert.equal(error.requestId, undefined);
});

test('an unknown workflow is a NotFoundError naming it, with no run', withServer, async () => {
  const error = await thrown(client().workflow.completions.create({ model: 'workflow:no-such-flow', input: {} }),
    NotFoundError, 404);
  assert.match(error.message, /no-such-flow/);
  assert.equal(error.requestId, undefined);
});

test('a run past its time limit is a WorkflowTimeoutError naming its run', withServer, async () => {
  const error = await thrown(client().workflow.completions.create({ model: 'workflow:sleeps', input: {} }),
    WorkflowTimeoutError, 408);
  assert.match(error.requestId, /^req_/);
  assert.equal(error.headers.get('x-should-retry'), 'false');
});

test('a script that raises is an InternalServerError naming its run, which the run records', withServer, async () => {
  const fp = client();
  const error = await thrown(fp.workflow.completions.create({ model: 'workflow:fails', input: {} }),
    InternalServerError, 500);
  assert.equal(error.type, 'script_error');
  assert.equal(error.error.message, 'ZeroDivisionError: division by zero');
  assert.equal(error.requestId, error.headers.get('x-request-id'));
  assert.equal(error.message, `500 script_error: ZeroDivisionError: division by zero (request_id ${error.requestId})`);

  const run = await fp.runs.get(error.requestId);
  assert.equal(run.status, 'failed');
  assert.match(run.error.traceback, /line 2, in divide/);
});

test('a body over the limit is a PayloadTooLargeError', withServer, async () => {
  const huge = 'x'.repeat(2 << 20); // over the server's 1 MB body limit
  const error = await thrown(client().workflow.completions.create({ model: 'workflow:echo', input: huge }),
    PayloadTooLargeError, 413);
  assert.match(error.message, /limit/);
});

test('an Idempotency-Key sent again with another request is an UnprocessableEntityError', withServer, async () => {
  const fp = client();
  const idempotencyKey = `node-${Math.random().toString(16).slice(2)}`;
  const first = await fp.workflow.completions.create({ model: 'workflow:echo', input: 1 }, { idempotencyKey });
  // The same key and request: the first run's answer, not a second run.
  const again = await fp.workflow.completions.create({ model: 'workflow:echo', input: 1 }, { idempotencyKey });
  assert.equal(again.request_id, first.request_id);

  const error = await thrown(fp.workflow.completions.create({ model: 'workflow:echo', input: 2 }, { idempotencyKey }),
    UnprocessableEntityError, 422);
  assert.equal(error.type, 'idempotency_key_reused');
  assert.match(error.message, new RegExp(first.request_id));
});

test('over a concurrency limit a RateLimitError carries Retry-After and x-should-retry', withServer, async () => {
  const fp = client({ apiKey: LIMITED_KEY });
  const holder = await fp.workflow.runs.create({ model: 'workflow:slow', input: { seconds: 2 }, cache: false });
  try {
    const error = await thrown(fp.workflow.completions.create({ model: 'workflow:slow', input: {}, cache: false }),
      RateLimitError, 429);
    assert.equal(error.type, 'rate_limit_exceeded');
    assert.equal(error.error.limit, 'concurrency');
    assert.equal(error.requestId, undefined); // nothing was started
    assert.ok(Number(error.headers.get('retry-after')) >= 1);
    assert.equal(error.headers.get('x-should-retry'), 'true');
  } finally {
    await eventually(async () => (await fp.runs.get(holder.request_id, { wait: 10 })).status === 'succeeded',
      'the holding run ended');
  }
});

test('a 429 whose Retry-After is over 10 s is thrown at once, not retried', withServer, async () => {
  const tries = [];
  const fp = client({ apiKey: RPM_KEY, maxRetries: 5, fetch: recordingFetch(tries) });
  // The one request of the minute.
  await fp.workflow.completions.create({ model: 'workflow:slow', input: {}, cache: false });

  const error = await thrown(fp.workflow.completions.create({ model: 'workflow:slow', input: {}, cache: false }),
    RateLimitError, 429);
  assert.deepEqual(tries.map((t) => t.status), [200, 429]);
  assert.ok(Number(error.headers.get('retry-after')) > 10);
  assert.equal(error.error.limit, 'rpm');
});

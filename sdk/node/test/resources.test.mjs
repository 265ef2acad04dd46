// Runs started without waiting, followed and looked up; workflows uploaded, listed and checked, as a CI job would.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import test from 'node:test';

import { BadRequestError } from '../index.mjs';
import { client, withServer } from '../test-support/server.mjs';

test('workflow.runs.create starts a run and runs.get with wait answers it once it ends', withServer, async () => {
  const fp = client();
  const run = await fp.workflow.runs.create({ model: 'workflow:slow', input: { seconds: 0.5 }, cache: false });
  assert.match(run.request_id, /^req_/);
  assert.equal(run.status_url, `/api/v1/runs/${run.request_id}`);

  const ended = await fp.workflow.runs.get(run.request_id, { wait: 30 });

  assert.equal(ended.status, 'succeeded');
  assert.deepEqual(ended.output, { slept: 0.5 });
});

test('runs.stream follows a run started without waiting: its chunks, then its completion', withServer, async () => {
  const fp = client();
  const run = await fp.workflow.runs.create({ model: 'workflow:emits', input: { steps: ['a'] }, cache: false });
  const events = [];
  for await (const event of fp.runs.stream(run.request_id)) {
    events.push(event.object === 'workflow.chunk' ? [event.type, event.content] : event.output);
  }
  assert.deepEqual(events, [['step', 'a'], ['progress', { done: true }], { steps: 1 }]);
});

test('workflows.upload stores a version that invokes, get and list show it, and the same script is unchanged',
  withServer, async () => {
    const fp = client();
    const ref = `node-up-${randomUUID().slice(0, 8)}`;
    const script = [
      'def execute(ctx):',
      '    return {"greeting": ctx.load_accessory("words")["hello"]}',
      '',
    ].join('\n');

    const created = await fp.workflows.upload({
      workflow_ref_name: ref, script, description: 'from node', accessories: { words: '{"hello": "bonjour"}' },
    });
    assert.equal(created.created, true);
    const response = await fp.workflow.completions.create({ model: `workflow:${ref}`, input: {} });
    assert.equal(response.output.greeting, 'bonjour');

    const workflow = await fp.workflows.get(ref);
    assert.equal(workflow.description, 'from node');
    const listed = await fp.workflows.list({ limit: 100 });
    assert.ok(listed.data.some((w) => JSON.stringify(w).includes(ref)), 'listed');
    assert.equal(listed.pagination.limit, 100);

    const again = await fp.workflows.upload({
      workflow_ref_name: ref, script, description: 'from node', accessories: { words: '{"hello": "bonjour"}' },
    });
    assert.equal(again.created, false);
    assert.equal((await fp.workflows.versions(ref)).pagination.total, 1);
  });

test('a script with no execute is refused at upload as a BadRequestError, and validate says why', withServer,
  async () => {
    const fp = client();
    const script = 'def run(ctx):\n    return 1\n';
    await assert.rejects(fp.workflows.upload({ workflow_ref_name: `node-bad-${randomUUID().slice(0, 8)}`, script }),
      (error) => error instanceof BadRequestError && /execute/.test(error.message));
    const checked = await fp.workflows.validate({ code: script });
    assert.equal(checked.ok, false);
    assert.ok(checked.errors.length >= 1);
  });

// The package as CommonJS code loads it: require() gives the same objects as import.
const assert = require('node:assert/strict');
const test = require('node:test');

test('require gives the Flowpool class, its named exports, and the very objects import gives', async () => {
  const Flowpool = require('flowpool'); // by its name, through package.json "exports"
  assert.equal(typeof Flowpool, 'function');
  assert.equal(Flowpool.Flowpool, Flowpool);
  assert.equal(Flowpool.default, Flowpool);
  assert.equal(require('../index.cjs'), Flowpool);

  const esm = await import('flowpool');
  assert.equal(esm.default, Flowpool);
  for (const name of ['Maitai', 'APIError', 'RateLimitError', 'APIConnectionError', 'APIUserAbortError']) {
    assert.equal(esm[name], Flowpool[name], name); // one class each: instanceof holds across both
  }
  assert.ok(new Flowpool.Maitai({ apiKey: 'k' }) instanceof esm.Flowpool);
});

test('a client loaded with require invokes a workflow', {
  skip: process.env.FLOWPOOL_BASE_URL ? false : 'needs a flowpool server: run tests/integration/test_node_sdk.py',
}, async () => {
  const { Flowpool } = require('flowpool');
  const client = new Flowpool({ maxRetries: 0 });
  const response = await client.workflow.completions.create({ model: 'workflow:echo', input: 'cjs' });
  assert.equal(response.output.input, 'cjs');
});

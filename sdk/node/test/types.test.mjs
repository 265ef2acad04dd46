// The hand-written types against the code: every runtime export declared, and both entry points' types agree.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import test from 'node:test';

const read = (name) => readFileSync(new URL(`../${name}`, import.meta.url), 'utf8');
const runtime = createRequire(import.meta.url)('../index.cjs');

test('index.d.ts declares each name index.cjs exports, and a default Flowpool', () => {
  const dts = read('index.d.ts');
  const declared = [...dts.matchAll(/^export declare (?:abstract )?(?:class|const|function|let) (\w+)/gm)]
    .map((m) => m[1]);
  const exported = Object.keys(runtime).filter((name) => name !== 'default');
  assert.deepEqual([...declared].sort(), [...exported].sort());
  assert.match(dts, /^export default Flowpool;$/m);
});

test('index.d.mts gives index.d.ts names to import, with Flowpool as its default', () => {
  const dmts = read('index.d.mts');
  assert.match(dmts, /^export \* from '\.\/index\.js';$/m);
  assert.match(dmts, /^import \{ Flowpool \} from '\.\/index\.js';$/m);
  assert.match(dmts, /^export default Flowpool;$/m);
  const pkg = JSON.parse(read('package.json'));
  assert.equal(pkg.exports['.'].import.types, './index.d.mts');
  assert.equal(pkg.exports['.'].require.types, './index.d.ts');
});

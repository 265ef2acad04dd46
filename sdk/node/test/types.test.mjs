// The hand-written types against the code: each name index.cjs exports is declared for `require` and for
// `import`; then, with TypeScript's compiler at hand, code written both ways (test-support/types/, the TypeScript
// of the README and of docs/node-sdk.md, and a use of every exported name) compiles against them.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import test from 'node:test';

const SDK = fileURLToPath(new URL('..', import.meta.url));
const read = (name) => readFileSync(join(SDK, name), 'utf8');
const runtime = createRequire(import.meta.url)('../index.cjs');
// What `require('flowpool')` carries besides `default` (the class itself), sorted.
const NAMES = Object.keys(runtime).filter((name) => name !== 'default').sort();

test('index.d.ts declares the Flowpool class as require gives it: each name index.cjs exports, and default', () => {
  const dts = read('index.d.ts');
  assert.match(dts, /^export = Flowpool;$/m);
  assert.match(dts, /^ {2}static readonly default: typeof Flowpool;$/m);
  // The values of the namespace merged into the class (its types are interfaces, nothing at run time).
  const declared = [...dts.matchAll(/^ {2}export (?:class|const|import) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual(declared.sort(), NAMES);
});

test('index.d.mts exports each name index.mjs exports and each type of index.d.ts, with Flowpool as default', async () => {
  const dmts = read('index.d.mts');
  assert.match(dmts, /^import Flowpool from '\.\/index\.js';$/m);
  assert.match(dmts, /^export default Flowpool;$/m);
  const values = dmts.match(/^export \{([^}]*)\} from '\.\/index\.js';$/m);
  assert.ok(values, 'index.d.mts re-exports the values of index.d.ts');
  const esm = await import('../index.mjs');
  assert.deepEqual(values[1].split(',').map((name) => name.trim()).filter(Boolean).sort(),
    Object.keys(esm).filter((name) => name !== 'default').sort());
  // ... and each type index.d.ts declares.
  const types = dmts.match(/^export type \{([^}]*)\} from '\.\/index\.js';$/m);
  assert.ok(types, 'index.d.mts re-exports the types of index.d.ts');
  assert.deepEqual(types[1].split(',').map((name) => name.trim()).filter(Boolean).sort(),
    [...read('index.d.ts').matchAll(/^ {2}export (?:interface|type) (\w+)/gm)].map((m) => m[1]).sort());
  const pkg = JSON.parse(read('package.json'));
  assert.equal(pkg.exports['.'].import.types, './index.d.mts');
  assert.equal(pkg.exports['.'].require.types, './index.d.ts');
  assert.equal(pkg.types, './index.d.ts');
});

/**
 * TypeScript's compiler: FLOWPOOL_TEST_TSC, else one installed here (node_modules/.bin), else `tsc` on PATH;
 * undefined when there is none. It is no dependency of the package: the test driver finds it, or says it did not.
 */
function findTsc() {
  const candidates = [process.env.FLOWPOOL_TEST_TSC, join(SDK, 'node_modules', '.bin', 'tsc'),
    ...(process.env.PATH ?? '').split(delimiter).filter(Boolean).map((dir) => join(dir, 'tsc'))];
  return candidates.find((path) => path && existsSync(path));
}

/** The ```ts blocks of a Markdown file. */
function tsBlocks(markdown) {
  return [...markdown.matchAll(/^```ts\n([\s\S]*?)^```$/gm)].map((m) => m[1]);
}

/** Compile `files` ({name: text}) in `dir` with these compiler options; fail showing tsc's errors. */
function compile(tsc, dir, compilerOptions, files) {
  const config = join(dir, `tsconfig.${compilerOptions.module}.json`);
  writeFileSync(config, JSON.stringify({
    compilerOptions: { strict: true, noEmit: true, target: 'es2022', lib: ['es2022', 'dom'], types: [],
      ...compilerOptions },
    files,
  }));
  const result = spawnSync(tsc, ['-p', config], { cwd: dir, encoding: 'utf8' });
  assert.equal(result.status, 0, `tsc ${JSON.stringify(compilerOptions)}:\n${result.stdout}${result.stderr}`);
}

const TSC = findTsc();

test('code using the package through import and require, and the docs\' TypeScript, compiles with tsc', {
  skip: TSC ? false : 'no TypeScript compiler: set FLOWPOOL_TEST_TSC, or put tsc on PATH (npm install typescript@5)',
}, () => {
  const dir = mkdtempSync(join(tmpdir(), 'flowpool-types-'));
  try {
    // The package by its name, as a project that installed it resolves it.
    mkdirSync(join(dir, 'node_modules'));
    symlinkSync(SDK, join(dir, 'node_modules', 'flowpool'), 'dir');
    for (const name of ['usage.mts', 'usage.cts', 'classic.ts']) {
      copyFileSync(join(SDK, 'test-support', 'types', name), join(dir, name));
    }
    // Every name the runtime exports, imported by name and reached as a property; and one it does not.
    writeFileSync(join(dir, 'names.mts'), [
      `import pkg, { ${NAMES.join(', ')} } from 'flowpool';`,
      `export const both = [${NAMES.map((name) => `[${name}, pkg.${name}]`).join(', ')}];`,
      '// @ts-expect-error not a name of the package',
      "import { NoSuchName } from 'flowpool';",
    ].join('\n'));
    writeFileSync(join(dir, 'names.cts'), [
      "import pkg = require('flowpool');",
      `const { ${NAMES.join(', ')} } = pkg;`,
      `export const all = [pkg.default, ${NAMES.join(', ')}];`,
    ].join('\n'));
    const snippets = [...tsBlocks(read('README.md')), ...tsBlocks(read('../../docs/node-sdk.md'))];
    assert.ok(snippets.length >= 2, 'the README and docs/node-sdk.md each show TypeScript');
    // Each snippet a module of its own (they use top-level await, and may declare the same names).
    snippets.forEach((text, i) => writeFileSync(join(dir, `snippet${i}.mts`), `${text}\nexport {};\n`));

    compile(TSC, dir, { module: 'nodenext', moduleResolution: 'nodenext' }, [
      'usage.mts', 'usage.cts', 'names.mts', 'names.cts', ...snippets.map((_, i) => `snippet${i}.mts`)]);
    compile(TSC, dir, { module: 'commonjs', moduleResolution: 'node10', esModuleInterop: true }, ['classic.ts']);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

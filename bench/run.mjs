// Runs every benchmark that applies to this machine, one after another.
//   npm run bench   (BENCH_OUT=dir also writes the JSON results there)
// SIGTERM and SIGINT stop the benchmark running and then this runner: none
// is left writing into the results.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { here } from './common.mjs';

let current = null;
for (const [signal, number] of [['SIGTERM', 15], ['SIGINT', 2]])
  process.on(signal, () => {
    if (current) current.kill(signal);
    process.exit(128 + number);
  });

for (const name of ['overhead', 'mapping', 'decode', 'attention', 'fragmentation', 'sharing', 'moves', 'prefix-cache']) {
  console.log(`\n== ${name} ==`);
  const status = await new Promise((done) => {
    current = spawn(process.execPath, [join(here, `${name}.mjs`), ...process.argv.slice(2)], { stdio: 'inherit' });
    current.on('error', () => done(1));
    current.on('close', (code) => done(code ?? 1));
  });
  current = null;
  if (status !== 0) process.exit(status);
}

// Runs every benchmark that applies to this machine, one after another.
//   npm run bench   (BENCH_OUT=dir also writes the JSON results there)
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { here } from './common.mjs';

for (const name of ['overhead', 'mapping', 'decode', 'attention', 'fragmentation', 'sharing', 'moves']) {
  console.log(`\n== ${name} ==`);
  const r = spawnSync(process.execPath, [join(here, `${name}.mjs`), ...process.argv.slice(2)], { stdio: 'inherit' });
  if (r.status !== 0) process.exit(r.status ?? 1);
}

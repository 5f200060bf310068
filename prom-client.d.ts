// For TypeScript's older `node10` module resolution, which ignores the
// package's exports map: `vattention/prom-client` resolves to this file.
export * from './dist/cjs/prom-client.js';

// For TypeScript's older `node10` module resolution, which ignores the
// package's exports map: `vattention/testing` resolves to this file.
export * from './dist/cjs/testing.js';
